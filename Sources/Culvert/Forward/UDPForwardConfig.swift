import Reactor

/// Everything `culvert forward udp` needs.
public struct UDPForwardConfig: Sendable {
    public var listen: HostPort
    public var targets: [HostPort]
    public var balance: BalanceStrategy = .roundRobin
    /// A session with no datagram either way for this long is closed.
    public var idleTimeout: Duration = .seconds(60)
    /// nil: `UDPSessionBudget`'s default, taken from the descriptors free at start.
    /// 0: no limit, so new sessions stop only when descriptors run out.
    public var maxSessions: Int?
    /// SO_RCVBUF/SO_SNDBUF for every socket.
    public var socketBuffer: Int = 4 << 20
    public var threads: Int = LoopGroup.coreCount

    public init(listen: HostPort, targets: [HostPort]) {
        self.listen = listen
        self.targets = targets.map(\.asTarget)
    }
}

/// What `culvert forward udp` was given on the command line; nil when a flag was not
/// given, so that `UDPForwardConfig`'s defaults apply.
public struct UDPForwardFlags: Sendable {
    public var listen: HostPort
    public var targets: [HostPort]
    public var balance: BalanceStrategy?
    public var idleTimeout: Duration?
    public var maxSessions: Int?
    public var socketBuffer: Int?
    public var threads: Int?
    public var log = LogFlags()

    public init(listen: HostPort, targets: [HostPort]) {
        self.listen = listen
        self.targets = targets
    }

    /// The rules the flags must follow; `resolve` checks them first, and a command line
    /// parser may check them early to report them as usage.
    public func check() throws(ConfigError) {
        try checkForwardTargets(targets, threads: threads)
        if let maxSessions, maxSessions < 0 {
            throw ConfigError(setting: "--max-sessions", "--max-sessions must be 0 (no limit) or more, got \(maxSessions)")
        }
        if idleTimeout == .zero { throw ConfigError(setting: "--idle-timeout", "--idle-timeout must be more than 0") }
    }
}

extension UDPForwardConfig {
    /// The forwarder's settings: `flags` over the defaults, checked.
    public static func resolve(flags: UDPForwardFlags) throws(ConfigError) -> Resolved<UDPForwardConfig> {
        try flags.check()
        var config = UDPForwardConfig(listen: flags.listen, targets: flags.targets)
        if let balance = flags.balance { config.balance = balance }
        if let idleTimeout = flags.idleTimeout { config.idleTimeout = idleTimeout }
        config.maxSessions = flags.maxSessions
        if let socketBuffer = flags.socketBuffer { config.socketBuffer = socketBuffer }
        if let threads = flags.threads { config.threads = threads }
        return Resolved(config: config, log: flags.log.over(LogSettings()))
    }
}
