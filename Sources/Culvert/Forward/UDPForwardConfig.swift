import Reactor

/// Everything `culvert forward udp` needs.
public struct UDPForwardConfig: Equatable, Sendable {
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
/// given, so that the config file, and then `UDPForwardConfig`'s defaults, apply.
public struct UDPForwardFlags: Sendable {
    /// nil: the listeners come from the config file.
    public var listen: HostPort?
    public var targets: [HostPort]
    public var balance: BalanceStrategy?
    public var idleTimeout: Duration?
    public var maxSessions: Int?
    public var socketBuffer: Int?
    public var threads: Int?
    public var log = LogFlags()

    public init(listen: HostPort?, targets: [HostPort]) {
        self.listen = listen
        self.targets = targets
    }

    /// The rules the flags must follow whatever the file says (`withFile`: whether a
    /// config file may supply the listeners); `resolve` checks them first, and a command
    /// line parser may check them early to report them as usage.
    public func check(withFile: Bool = false) throws(ConfigError) {
        try checkForwardListen(listen, targets: targets, threads: threads, withFile: withFile)
        if let maxSessions, maxSessions < 0 {
            throw ConfigError(setting: "--max-sessions", "--max-sessions must be 0 (no limit) or more, got \(maxSessions)")
        }
        if idleTimeout == .zero { throw ConfigError(setting: "--idle-timeout", "--idle-timeout must be more than 0") }
    }
}

extension UDPForwardConfig {
    /// The first listener's settings: `flags` over the defaults, checked.
    public static func resolve(flags: UDPForwardFlags) throws(ConfigError) -> Resolved<UDPForwardConfig> {
        let all = try resolve(flags: flags, file: nil)
        return Resolved(config: all.config[0], log: all.log, warnings: all.warnings)
    }

    /// Every listener of the process, as `TCPForwardConfig.resolve(flags:file:)` lays them out.
    public static func resolve(flags: UDPForwardFlags, file: String?) throws(ConfigError) -> Resolved<[UDPForwardConfig]> {
        try flags.check(withFile: file != nil)
        let contents = try file.map { (path) throws(ConfigError) in try ForwardConfigFile.load(path, udp: true) }
        var configs: [UDPForwardConfig] = []
        for (_, layer) in try forwardLayers(flags.listen, flags.targets, contents) {
            var config = UDPForwardConfig(listen: layer.listen!, targets: layer.targets!)
            if let balance = flags.balance ?? layer.balance { config.balance = balance }
            if let idleTimeout = flags.idleTimeout ?? layer.idleTimeout ?? nil { config.idleTimeout = idleTimeout }
            config.maxSessions = flags.maxSessions ?? layer.maxSessions
            if let socketBuffer = flags.socketBuffer ?? layer.socketBuffer { config.socketBuffer = socketBuffer }
            if let threads = flags.threads ?? contents?.threads { config.threads = threads }
            configs.append(config)
        }
        return Resolved(config: configs, log: flags.log.over(contents?.log ?? LogSettings()), admin: contents?.admin ?? AdminFlags())
    }
}
