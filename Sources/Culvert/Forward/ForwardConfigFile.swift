import Logging
import TOMLKit

/// Reads `culvert forward tcp|udp -c FILE`: the keys of the command's flags at the top
/// level (`listen` and `targets` there make one listener, and every other key is the
/// default of all listeners), plus `[services.NAME]` tables, each one more listener with
/// its own `listen`, `targets` and any per-listener key. `protocol = "tcp"|"udp"` says
/// which command the file is for (default tcp).
///
/// Per-listener keys, tcp: balance, connect_timeout, idle_timeout, max_connections,
/// no_splice, send_proxy, accept_proxy; udp: balance, idle_timeout, max_sessions, socket_buffer. Process keys (top
/// level only): drain_timeout (tcp), threads, log_level, log_format, admin, admin_token_file.
enum ForwardConfigFile {
    /// One listener's settings from the file: `listen` and `targets` when this table gave
    /// them, and the per-listener keys it set, each nil when not set here.
    struct Layer {
        var listen: HostPort?
        var targets: [HostPort]?
        var balance: BalanceStrategy?
        var connectTimeout: Duration?
        /// `.some(nil)`: `idle_timeout = "off"`.
        var idleTimeout: Duration??
        var maxConnections: Int?
        var noSplice: Bool?
        var sendProxy: ProxyProtocolVersion?
        var acceptProxy: Bool?
        var maxSessions: Int?
        var socketBuffer: Int?

        /// `self`'s keys laid over `base`'s.
        func over(_ base: Layer) -> Layer {
            Layer(listen: listen ?? base.listen, targets: targets ?? base.targets, balance: balance ?? base.balance,
                  connectTimeout: connectTimeout ?? base.connectTimeout, idleTimeout: idleTimeout ?? base.idleTimeout,
                  maxConnections: maxConnections ?? base.maxConnections, noSplice: noSplice ?? base.noSplice,
                  sendProxy: sendProxy ?? base.sendProxy, acceptProxy: acceptProxy ?? base.acceptProxy,
                  maxSessions: maxSessions ?? base.maxSessions, socketBuffer: socketBuffer ?? base.socketBuffer)
        }
    }

    /// The whole file: the top level, the named listeners (sorted by name), the process keys.
    struct Contents {
        var path: String
        var top: Layer
        var services: [(name: String, layer: Layer)]
        var drainTimeout: Duration?
        var threads: Int?
        var log: LogSettings
        var admin: AdminFlags
    }

    /// Which forward command a file is for, by its `protocol` key, without reading the rest.
    static func declaredProtocol(of file: ConfigFile) throws(ConfigError) -> String {
        let value = try file.string("protocol") ?? "tcp"
        guard value == "tcp" || value == "udp" else { throw file.error("protocol", "'\(value)' is not tcp or udp") }
        return value
    }

    static func load(_ path: String, udp: Bool) throws(ConfigError) -> Contents {
        let file = try ConfigFile(path: path)
        let proto = try declaredProtocol(of: file)
        if proto != (udp ? "udp" : "tcp") {
            throw file.error("protocol", "this file is for 'forward \(proto)', not 'forward \(udp ? "udp" : "tcp")'")
        }
        let top = try layer(file, table: nil, prefix: "", udp: udp)
        var services: [(String, Layer)] = []
        for (name, table) in try file.tables("services") {
            let prefix = "services.\(name)."
            let service = try layer(file, table: table, prefix: prefix, udp: udp)
            if service.listen == nil { throw file.error(prefix + "listen", "missing, e.g. listen = \"127.0.0.1:8080\"") }
            if service.targets == nil { throw file.error(prefix + "targets", "missing, e.g. targets = [\"127.0.0.1:9000\"]") }
            try file.rejectUnknownKeys(in: table, prefix: prefix)
            services.append((name, service))
        }
        if top.listen != nil && top.targets == nil { throw file.error("targets", "missing: listen needs targets") }
        if top.listen == nil && top.targets != nil { throw file.error("listen", "missing: targets need a listen address") }
        let drain = udp ? nil : try file.duration("drain_timeout")
        let threads = try file.int("threads", range: 1...1024)
        var log = LogSettings()
        if let level = try file.parse("log_level", try file.string("log_level"), parseLogLevel) { log.level = level }
        if let format = try file.parse("log_format", try file.string("log_format"), parseLogFormat) { log.format = format }
        let admin = AdminFlags(address: try file.parse("admin", try file.string("admin"), HostPort.parse),
                               tokenFile: try file.string("admin_token_file"))
        try file.rejectUnknownKeys()
        return Contents(path: path, top: top, services: services, drainTimeout: drain, threads: threads, log: log, admin: admin)
    }

    private static func layer(_ file: ConfigFile, table: TOMLTable?, prefix: String, udp: Bool) throws(ConfigError) -> Layer {
        var layer = Layer()
        layer.listen = try file.parse(prefix + "listen", try file.string("listen", in: table, prefix: prefix), HostPort.parse)
        if let targets = try file.strings("targets", in: table, prefix: prefix) {
            var parsed: [HostPort] = []
            for t in targets {
                guard let target = try file.parse(prefix + "targets", t, HostPort.parse)?.asTarget else { continue }
                do { try target.checkConnectable() } catch { throw file.error(prefix + "targets", error.description) }
                parsed.append(target)
            }
            if parsed.isEmpty { throw file.error(prefix + "targets", "give at least one target address") }
            layer.targets = parsed
        }
        layer.balance = try file.parse(prefix + "balance", try file.string("balance", in: table, prefix: prefix), parseBalance)
        layer.idleTimeout = try file.parse(prefix + "idle_timeout", try idleText(file, table: table, prefix: prefix),
                                           DurationSpec.parseOptional)
        if udp {
            if case .some(.none) = layer.idleTimeout { throw file.error(prefix + "idle_timeout", "must be more than 0") }
            layer.maxSessions = try file.int("max_sessions", range: 0...Int(Int32.max), in: table, prefix: prefix)
            layer.socketBuffer = try file.int("socket_buffer", range: 0...(1 << 30), in: table, prefix: prefix)
        } else {
            layer.connectTimeout = try file.duration("connect_timeout", in: table, prefix: prefix)
            if layer.connectTimeout == .zero { throw file.error(prefix + "connect_timeout", "must be more than 0") }
            layer.maxConnections = try file.int("max_connections", range: 0...Int(Int32.max), in: table, prefix: prefix)
            layer.noSplice = try file.bool("no_splice", in: table, prefix: prefix)
            layer.sendProxy = try file.parse(prefix + "send_proxy", try file.string("send_proxy", in: table, prefix: prefix), parseProxyVersion)
            layer.acceptProxy = try file.bool("accept_proxy", in: table, prefix: prefix)
        }
        return layer
    }

    /// `idle_timeout` as text: a number of seconds or a duration string, or "off".
    private static func idleText(_ file: ConfigFile, table: TOMLTable?, prefix: String) throws(ConfigError) -> String? {
        if let seconds = try? file.int("idle_timeout", range: 0...Int(Int32.max), in: table, prefix: prefix) { return "\(seconds)" }
        return try file.string("idle_timeout", in: table, prefix: prefix)
    }

    struct InvalidValue: Error, CustomStringConvertible {
        let description: String
    }

    static func parseLogLevel(_ text: String) throws(InvalidValue) -> Logger.Level {
        guard let level = Logger.Level(rawValue: text) else { throw InvalidValue(description: "'\(text)' is not a log level") }
        return level
    }

    static func parseLogFormat(_ text: String) throws(InvalidValue) -> LogFormat {
        guard let format = LogFormat(rawValue: text) else { throw InvalidValue(description: "'\(text)' is not text or json") }
        return format
    }

    static func parseProxyVersion(_ text: String) throws(InvalidValue) -> ProxyProtocolVersion {
        guard let version = ProxyProtocolVersion(rawValue: text) else { throw InvalidValue(description: "'\(text)' is not v1 or v2") }
        return version
    }

    private static func parseBalance(_ text: String) throws(InvalidValue) -> BalanceStrategy {
        guard let b = BalanceStrategy(rawValue: text) else {
            throw InvalidValue(description: "'\(text)' is not \(BalanceStrategy.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return b
    }
}
