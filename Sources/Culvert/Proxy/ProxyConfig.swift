import Reactor
import Transfer

/// Everything `culvert proxy` needs, checked.
public struct ProxyConfig: Sendable {
    public var listen: HostPort
    /// nil: no authentication.
    public var credentials: ProxyCredentials?
    public var policy = ProxyPolicy()
    /// Time allowed to connect to a destination (all its addresses).
    public var connectTimeout: Duration = .seconds(10)
    /// Time a client gets to finish its greeting and request (slow clients hold a place).
    public var handshakeTimeout: Duration = .seconds(10)
    /// Time a kept-alive HTTP client connection may wait for its next request.
    public var keepAliveTimeout: Duration = .seconds(60)
    public var idleTimeout: Duration?
    /// nil: derived from the descriptors free at start.
    public var maxConnections: Int?
    public var drainTimeout: Duration = .seconds(30)
    public var threads: Int = LoopGroup.coreCount
    public var splice = true
    /// The longest request or response head the HTTP side reads (a longer request is
    /// answered 431).
    public var maxHeadBytes = 64 * 1024
    /// A UDP association with no datagram either way for this long ends (and its TCP
    /// connection with it).
    public var udpIdleTimeout: Duration = .seconds(120)
    /// nil: derived from the descriptors free at start.
    public var maxAssociations: Int?
    /// Destinations one UDP association talks to at once, a socket each; a new one
    /// closes the least recently used.
    public var udpSocketsPerAssociation = 16

    public init(listen: HostPort) {
        self.listen = listen
    }
}

/// What `culvert proxy` was given on the command line (or in its config file); nil when
/// a flag was not given.
public struct ProxyFlags: Sendable {
    /// nil: from the config file.
    public var listen: HostPort?
    public var authFile: String?
    public var noAuth = false
    public var allow: [String] = []
    public var deny: [String] = []
    public var connectTimeout: Duration?
    public var handshakeTimeout: Duration?
    /// `.some(nil)`: `--idle-timeout off`.
    public var idleTimeout: Duration??
    public var maxConnections: Int?
    public var udpIdleTimeout: Duration?
    public var maxAssociations: Int?
    public var drainTimeout: Duration?
    public var threads: Int?
    public var noSplice = false
    public var log = LogFlags()
    /// The config file's admin keys (the command line's are the command's own options).
    var admin = AdminFlags()

    public init(listen: HostPort?) {
        self.listen = listen
    }

    /// These flags laid over `base` (the config file's): a flag given wins, a list given
    /// replaces the file's, and a switch set in either is set.
    func over(_ base: ProxyFlags) -> ProxyFlags {
        var out = self
        out.listen = listen ?? base.listen
        out.authFile = authFile ?? base.authFile
        out.noAuth = noAuth || base.noAuth
        if allow.isEmpty { out.allow = base.allow }
        if deny.isEmpty { out.deny = base.deny }
        out.connectTimeout = connectTimeout ?? base.connectTimeout
        out.handshakeTimeout = handshakeTimeout ?? base.handshakeTimeout
        out.idleTimeout = idleTimeout ?? base.idleTimeout
        out.maxConnections = maxConnections ?? base.maxConnections
        out.udpIdleTimeout = udpIdleTimeout ?? base.udpIdleTimeout
        out.maxAssociations = maxAssociations ?? base.maxAssociations
        out.drainTimeout = drainTimeout ?? base.drainTimeout
        out.threads = threads ?? base.threads
        out.noSplice = noSplice || base.noSplice
        out.log = LogFlags(level: log.level ?? base.log.level, format: log.format ?? base.log.format)
        out.admin = admin.over(base.admin)
        return out
    }

    /// The checks of the command line alone (`withFile`: a config file may add what is
    /// missing); `resolve` runs them again on the merged settings.
    public func check(withFile: Bool = false) throws(ConfigError) {
        guard let listen else {
            if withFile { return try checkValues() }
            throw ConfigError(setting: "<listen>", "missing <listen>: give LISTEN, or -c FILE with listen = \"HOST:PORT\"")
        }
        try checkValues()
        // With a file, its auth_file or no_auth may still make the listener acceptable.
        if !withFile && authFile == nil && !noAuth && !ProxyConfig.isLoopback(listen.host) {
            throw ConfigError(setting: "--no-auth",
                "refusing to run an unauthenticated proxy on \(listen), which is not a loopback address: "
                + "give --auth-file FILE, or --no-auth to run it open on purpose")
        }
    }

    private func checkValues() throws(ConfigError) {
        if let threads, threads < 1 || threads > 1024 {
            throw ConfigError(setting: "--threads", "--threads must be between 1 and 1024, got \(threads)")
        }
        if let maxConnections, maxConnections < 1 {
            throw ConfigError(setting: "--max-connections", "--max-connections must be 1 or more, got \(maxConnections)")
        }
        if let maxAssociations, maxAssociations < 1 {
            throw ConfigError(setting: "--max-udp-associations", "--max-udp-associations must be 1 or more, got \(maxAssociations)")
        }
        if udpIdleTimeout == .zero { throw ConfigError(setting: "--udp-idle-timeout", "--udp-idle-timeout must be more than 0") }
        if connectTimeout == .zero { throw ConfigError(setting: "--connect-timeout", "--connect-timeout must be more than 0") }
        if handshakeTimeout == .zero { throw ConfigError(setting: "--handshake-timeout", "--handshake-timeout must be more than 0") }
        if authFile != nil && noAuth {
            throw ConfigError(setting: "--no-auth", "--no-auth and --auth-file contradict each other: give one")
        }
        _ = try ProxyRule.parseAll(allow, flag: "--allow")
        _ = try ProxyRule.parseAll(deny, flag: "--deny")
    }
}

extension ProxyConfig {
    /// The proxy's settings: `flags` over the config file's keys (when `file` is given)
    /// over the defaults, checked, the auth file read.
    public static func resolve(flags given: ProxyFlags, file: String? = nil) throws(ConfigError) -> Resolved<ProxyConfig> {
        try given.check(withFile: file != nil)
        let flags = try file.map { (path) throws(ConfigError) in given.over(try ProxyConfigFile.load(path)) } ?? given
        try flags.check()
        guard let listen = flags.listen else { throw ConfigError(setting: "<listen>", "missing <listen>") }
        var config = ProxyConfig(listen: listen)
        config.credentials = try flags.authFile.map { (path) throws(ConfigError) in try ProxyCredentials.load(path) }
        config.policy = ProxyPolicy(allow: try ProxyRule.parseAll(flags.allow, flag: "--allow"), deny: try ProxyRule.parseAll(flags.deny, flag: "--deny"))
        if let v = flags.connectTimeout { config.connectTimeout = v }
        if let v = flags.handshakeTimeout { config.handshakeTimeout = v }
        config.idleTimeout = flags.idleTimeout ?? nil
        config.maxConnections = flags.maxConnections
        if let v = flags.udpIdleTimeout { config.udpIdleTimeout = v }
        config.maxAssociations = flags.maxAssociations
        if let v = flags.drainTimeout { config.drainTimeout = v }
        if let v = flags.threads { config.threads = v }
        config.splice = !flags.noSplice
        return Resolved(config: config, log: flags.log.over(LogSettings()), admin: flags.admin)
    }

    /// Whether a listen host reaches this machine only: 127.0.0.0/8, ::1, `localhost`.
    /// A wildcard or another name counts as public.
    static func isLoopback(_ host: String?) -> Bool {
        guard let host else { return false }
        if host.lowercased() == "localhost" { return true }
        guard let address = SocketAddress(numericHost: host, port: 0) else { return false }
        let bytes = ProxyRule.addressBytes(address)
        return bytes.count == 4 ? bytes[0] == 127 : bytes == [UInt8](repeating: 0, count: 15) + [1]
    }
}
