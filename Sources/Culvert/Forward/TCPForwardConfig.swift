import Reactor
import Transfer

/// `--send-proxy v1|v2`, `proxy_protocol = "v1"|"v2"`: which PROXY protocol header to
/// write to a target before the client's bytes.
public typealias ProxyProtocolVersion = ProxyHeader.Version

/// Everything `culvert forward tcp` needs, whether it came from flags or a config file.
public struct TCPForwardConfig: Equatable, Sendable {
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
    /// Write a PROXY header naming the client to each target connection first.
    public var sendProxy: ProxyProtocolVersion?
    /// Each client must start with a PROXY header (we sit behind haproxy or a load
    /// balancer); its source is the client's address from then on.
    public var acceptProxy = false
    /// How long a client gets to send its whole PROXY header.
    public var proxyHeaderTimeout: Duration = .seconds(5)

    public init(listen: HostPort, targets: [HostPort]) {
        self.listen = listen
        self.targets = targets.map(\.asTarget)
    }
}

/// What `culvert forward tcp` was given on the command line; nil when a flag was not
/// given, so that the config file, and then `TCPForwardConfig`'s defaults, apply.
public struct TCPForwardFlags: Sendable {
    /// nil: the listeners come from the config file.
    public var listen: HostPort?
    public var targets: [HostPort]
    public var balance: BalanceStrategy?
    public var connectTimeout: Duration?
    /// nil: not given; `.some(nil)`: `--idle-timeout off`.
    public var idleTimeout: Duration??
    public var maxConnections: Int?
    public var drainTimeout: Duration?
    public var threads: Int?
    public var noSplice = false
    public var log = LogFlags()
    public var ingress: WebSocketIngress?
    /// Set when the target is a WebSocket URL (`targets` then holds its host and port).
    public var egress: WebSocketEgress?
    public var sendProxy: ProxyProtocolVersion?
    public var acceptProxy = false

    public init(listen: HostPort?, targets: [HostPort]) {
        self.listen = listen
        self.targets = targets
    }

    /// The rules the flags must follow whatever the file says (`withFile`: whether a
    /// config file may supply the listeners); `resolve` checks them first, and a command
    /// line parser may check them early to report them as usage.
    public func check(withFile: Bool = false) throws(ConfigError) {
        try checkForwardListen(listen, targets: targets, threads: threads, withFile: withFile)
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
            if sendProxy != nil {
                throw ConfigError(setting: "--send-proxy", "--send-proxy writes to a TCP target, not to a WebSocket target (\(egress.url))")
            }
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
    /// The first listener's settings: `flags` over the defaults, checked.
    public static func resolve(flags: TCPForwardFlags) throws(ConfigError) -> Resolved<TCPForwardConfig> {
        let all = try resolve(flags: flags, file: nil)
        return Resolved(config: all.config[0], log: all.log, warnings: all.warnings)
    }

    /// Every listener of the process: LISTEN TARGET... from the command line (or else the
    /// file's top-level `listen` and `targets`), then the file's `[services.NAME]` in name
    /// order; each is flags over its table over the file's top level over the defaults.
    /// The WebSocket ends (`forward ws`, a ws:// target) are the command line's listener's.
    /// Pure apart from reading the file, so a reload can call it again.
    public static func resolve(flags: TCPForwardFlags, file: String?) throws(ConfigError) -> Resolved<[TCPForwardConfig]> {
        try flags.check(withFile: file != nil)
        let contents = try file.map { (path) throws(ConfigError) in try ForwardConfigFile.load(path, udp: false) }
        let layers = try forwardLayers(flags.listen, flags.targets, contents)
        var configs: [TCPForwardConfig] = []
        for (key, layer) in layers {
            var config = TCPForwardConfig(listen: layer.listen!, targets: layer.targets!)
            if let balance = flags.balance ?? layer.balance { config.balance = balance }
            if let connectTimeout = flags.connectTimeout ?? layer.connectTimeout { config.connectTimeout = connectTimeout }
            if let idleTimeout = flags.idleTimeout ?? layer.idleTimeout { config.idleTimeout = idleTimeout }
            if let maxConnections = flags.maxConnections ?? layer.maxConnections { config.maxConnections = maxConnections }
            if let drainTimeout = flags.drainTimeout ?? contents?.drainTimeout { config.drainTimeout = drainTimeout }
            if let threads = flags.threads ?? contents?.threads { config.threads = threads }
            config.splice = !(flags.noSplice || layer.noSplice == true)
            config.sendProxy = flags.sendProxy ?? layer.sendProxy
            config.acceptProxy = flags.acceptProxy || layer.acceptProxy == true
            if key == "<listen>" {
                config.ingress = flags.ingress
                config.egress = flags.egress
            }
            configs.append(config)
        }
        return Resolved(config: configs, log: flags.log.over(contents?.log ?? LogSettings()), admin: contents?.admin ?? AdminFlags())
    }
}

/// The checks `forward tcp` and `forward udp` share.
func checkForwardListen(_ listen: HostPort?, targets: [HostPort], threads: Int?, withFile: Bool) throws(ConfigError) {
    if listen == nil && !withFile {
        throw ConfigError(setting: "<listen>", "missing <listen>: give LISTEN TARGET..., or -c FILE")
    }
    if listen == nil && !targets.isEmpty {
        throw ConfigError(setting: "<targets>", "targets need a LISTEN address before them")
    }
    if listen != nil && targets.isEmpty {
        throw ConfigError(setting: "<targets>", "missing <targets>: give at least one TARGET address to relay to")
    }
    for target in targets {
        do { try target.asTarget.checkConnectable() } catch { throw ConfigError(setting: "<targets>", error.description) }
    }
    if let threads, threads < 1 || threads > 1024 {
        throw ConfigError(setting: "--threads", "--threads must be between 1 and 1024, got \(threads)")
    }
}

/// The listeners' layers, named by the command line (`<listen>`) or their file table:
/// the command line's LISTEN TARGET... replaces the file's top-level pair. Two
/// listeners on one address are an error naming the second.
func forwardLayers(_ listen: HostPort?, _ targets: [HostPort],
                   _ contents: ForwardConfigFile.Contents?) throws(ConfigError) -> [(key: String, layer: ForwardConfigFile.Layer)] {
    let top = contents?.top ?? ForwardConfigFile.Layer()
    var layers: [(key: String, layer: ForwardConfigFile.Layer)] = []
    if let listen {
        var commandLine = top
        commandLine.listen = listen
        commandLine.targets = targets.map(\.asTarget)
        layers.append(("<listen>", commandLine))
    } else if top.listen != nil {
        layers.append(("listen", top))
    }
    for (name, layer) in contents?.services ?? [] { layers.append(("services.\(name).listen", layer.over(top))) }
    guard let contents else { return layers }
    if layers.isEmpty {
        throw ConfigError(file: contents.path, key: "listen", message: "no listener: set listen and targets, or add [services.NAME] tables")
    }
    var seen: [String: String] = [:]
    for (key, layer) in layers {
        if let first = seen[layer.listen!.description] {
            throw ConfigError(file: contents.path, key: key, message: "\(layer.listen!) is already the listen address of \(first)")
        }
        seen[layer.listen!.description] = key
    }
    return layers
}
