import Reactor

/// Everything `culvert forward tcp` needs, whether it came from flags or a config file.
public struct TCPForwardConfig: Sendable {
    public var listen: HostPort
    public var targets: [HostPort]
    public var balance: BalanceStrategy = .roundRobin
    public var connectTimeout: Duration = .seconds(5)
    public var idleTimeout: Duration?
    /// 0 means unlimited.
    public var maxConnections: Int = 0
    public var drainTimeout: Duration = .seconds(30)
    public var threads: Int = LoopGroup.coreCount
    /// false forces the buffered copier (for comparison and tests).
    public var splice: Bool = true
    /// `forward ws`: accepted connections are WebSocket upgrades.
    public var ingress: WebSocketIngress?
    /// A `ws://`/`wss://` target: connections are carried to a WebSocket endpoint.
    public var egress: WebSocketEgress?

    public init(listen: HostPort, targets: [HostPort]) {
        self.listen = listen
        self.targets = targets.map(\.asTarget)
    }
}

/// What `culvert forward tcp` was given on the command line; nil when a flag was not
/// given, so that `TCPForwardConfig`'s defaults apply.
public struct TCPForwardFlags: Sendable {
    public var listen: HostPort
    public var targets: [HostPort]
    public var balance: BalanceStrategy?
    public var connectTimeout: Duration?
    /// nil: no idle timeout.
    public var idleTimeout: Duration?
    public var maxConnections: Int?
    public var drainTimeout: Duration?
    public var threads: Int?
    public var noSplice = false
    public var log = LogFlags()
    public var ingress: WebSocketIngress?
    /// Set when the target is a WebSocket URL (`targets` then holds its host and port).
    public var egress: WebSocketEgress?

    public init(listen: HostPort, targets: [HostPort]) {
        self.listen = listen
        self.targets = targets
    }

    /// The rules the flags must follow; `resolve` checks them first, and a command line
    /// parser may check them early to report them as usage.
    public func check() throws(ConfigError) {
        try checkForwardTargets(targets, threads: threads)
        if let maxConnections, maxConnections < 0 {
            throw ConfigError(setting: "--max-connections", "--max-connections must be 0 (no limit) or more, got \(maxConnections)")
        }
        if connectTimeout == .zero { throw ConfigError(setting: "--connect-timeout", "--connect-timeout must be more than 0") }
        if let ingress {
            if !ingress.path.hasPrefix("/") || ingress.path.contains(where: { $0.isWhitespace || $0 == "?" }) {
                throw ConfigError(setting: "--ws-path", "--ws-path must start with / and hold no spaces or '?', got '\(ingress.path)'")
            }
            if (ingress.certFile == nil) != (ingress.keyFile == nil) {
                throw ConfigError(setting: "--cert", "--cert and --key go together: give both for wss, neither for ws")
            }
            try checkMaxMessage(ingress.settings.maxMessage)
        }
        if let egress {
            if targets.count != 1 {
                throw ConfigError(setting: "<targets>", "a WebSocket target (\(egress.url)) must be the only target")
            }
            if !egress.url.secure && (egress.caFile != nil || egress.serverName != nil) {
                throw ConfigError(setting: egress.caFile != nil ? "--ca" : "--sni", "--ca and --sni apply to a wss:// target, not \(egress.url)")
            }
            try checkMaxMessage(egress.settings.maxMessage)
        }
    }

    private func checkMaxMessage(_ size: Int) throws(ConfigError) {
        if size < 1 { throw ConfigError(setting: "--ws-max-message", "--ws-max-message must be at least 1 byte, got \(size)") }
    }
}

extension TCPForwardConfig {
    /// The forwarder's settings: `flags` over the defaults, checked.
    public static func resolve(flags: TCPForwardFlags) throws(ConfigError) -> Resolved<TCPForwardConfig> {
        try flags.check()
        var config = TCPForwardConfig(listen: flags.listen, targets: flags.targets)
        if let balance = flags.balance { config.balance = balance }
        if let connectTimeout = flags.connectTimeout { config.connectTimeout = connectTimeout }
        config.idleTimeout = flags.idleTimeout
        if let maxConnections = flags.maxConnections { config.maxConnections = maxConnections }
        if let drainTimeout = flags.drainTimeout { config.drainTimeout = drainTimeout }
        if let threads = flags.threads { config.threads = threads }
        config.splice = !flags.noSplice
        config.ingress = flags.ingress
        config.egress = flags.egress
        return Resolved(config: config, log: flags.log.over(LogSettings()))
    }
}

/// The checks `forward tcp` and `forward udp` share.
func checkForwardTargets(_ targets: [HostPort], threads: Int?) throws(ConfigError) {
    if targets.isEmpty {
        throw ConfigError(setting: "<targets>", "missing <targets>: give at least one TARGET address to relay to")
    }
    if let threads, threads < 1 || threads > 1024 {
        throw ConfigError(setting: "--threads", "--threads must be between 1 and 1024, got \(threads)")
    }
}
