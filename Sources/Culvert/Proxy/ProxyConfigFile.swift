/// Reads `culvert proxy -c FILE`: the keys of the command's flags, at the top level,
/// which the flags given on the command line override (a list given there replaces the
/// file's). Keys: listen, auth_file, no_auth, allow, deny (a string or an array),
/// connect_timeout, handshake_timeout, idle_timeout ("off" or a duration),
/// max_connections, udp_idle_timeout, max_udp_associations, drain_timeout, threads,
/// no_splice, log_level, log_format, admin, admin_token_file. Durations are a number of seconds or a string like
/// "500ms"; `auth_file` is read relative to the working directory.
enum ProxyConfigFile {
    /// The file's settings as the flags they stand for (`listen` nil when not set).
    static func load(_ path: String) throws(ConfigError) -> ProxyFlags {
        let file = try ConfigFile(path: path)
        var flags = ProxyFlags(listen: try file.parse("listen", try file.string("listen"), HostPort.parse))
        flags.authFile = try file.string("auth_file")
        flags.noAuth = try file.bool("no_auth") ?? false
        flags.allow = try file.strings("allow") ?? []
        flags.deny = try file.strings("deny") ?? []
        flags.connectTimeout = try file.duration("connect_timeout")
        flags.handshakeTimeout = try file.duration("handshake_timeout")
        if let seconds = try? file.int("idle_timeout", range: 0...Int(Int32.max)) {
            flags.idleTimeout = seconds == 0 ? nil : .seconds(seconds)
        } else {
            flags.idleTimeout = try file.parse("idle_timeout", try file.string("idle_timeout"), DurationSpec.parseOptional) ?? nil
        }
        flags.maxConnections = try file.int("max_connections", range: 1...Int(Int32.max))
        flags.udpIdleTimeout = try file.duration("udp_idle_timeout")
        flags.maxAssociations = try file.int("max_udp_associations", range: 1...Int(Int32.max))
        flags.drainTimeout = try file.duration("drain_timeout")
        flags.threads = try file.int("threads", range: 1...1024)
        flags.noSplice = try file.bool("no_splice") ?? false
        flags.log.level = try file.parse("log_level", try file.string("log_level"), ForwardConfigFile.parseLogLevel)
        flags.log.format = try file.parse("log_format", try file.string("log_format"), ForwardConfigFile.parseLogFormat)
        flags.admin = AdminFlags(address: try file.parse("admin", try file.string("admin"), HostPort.parse),
                                 tokenFile: try file.string("admin_token_file"))
        try file.rejectUnknownKeys()
        return flags
    }
}
