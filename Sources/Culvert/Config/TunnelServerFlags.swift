/// What `culvert server` was given on the command line; nil or empty when a flag was not
/// given, so that the config file, and then `TunnelServerConfig`'s defaults, apply.
public struct TunnelServerFlags: Sendable {
    public var listen: [HostPort] = []
    public var token = TokenFlags()
    public var common = TunnelCommonFlags()
    public var log = LogFlags()
    public var cert: String?
    public var key: String?
    public var allowPorts: PortRanges?
    public var bindAddresses: [String] = []
    public var maxClients: Int?
    public var maxServices: Int?
    public var maxUnauthenticated: Int?
    public var maxUnauthenticatedPerSource: Int?
    /// `--ws-path` and `--inner`, with `--transport ws` or `wss`.
    public var wsPath: String?
    public var inner: TunnelWebSocket.Inner?
    /// `--ws-ping`: nil not given, `.some(nil)` off.
    public var wsPing: Duration??
    public var acceptProxy = false
    public var allowExit = false
    public var exitAllow: [String] = []
    public var exitDeny: [String] = []

    public init() {}

    /// The rules the flags must follow whatever the file says; `resolve` checks them
    /// first, and a command line parser may check them early to report them as usage.
    public func check() throws(ConfigError) {
        try common.check()
        if (cert == nil) != (key == nil) { throw ConfigError(setting: cert == nil ? "--cert" : "--key", "--cert and --key go together") }
        if cert != nil && common.transport == .plain { throw ConfigError(setting: "--cert", "--cert needs --transport tls") }
        if cert != nil && common.transport == .ws {
            throw ConfigError(setting: "--cert", "--transport ws leaves TLS to the proxy in front; for culvert to terminate TLS with --cert use --transport wss")
        }
        if common.transport == .wss && cert == nil {
            throw ConfigError(setting: "--transport", "--transport wss needs --cert and --key (or --transport ws behind a TLS-terminating proxy)")
        }
        if let wsPath, !wsPath.hasPrefix("/") || wsPath.contains(where: { !$0.isASCII || $0.isWhitespace || $0 == "?" }) {
            throw ConfigError(setting: "--ws-path", "--ws-path '\(wsPath)' must start with / and be ASCII without spaces or '?'")
        }
        if common.transport?.isWebSocket != true {
            for (name, given) in [("--ws-path", wsPath != nil), ("--inner", inner != nil), ("--ws-ping", wsPing != nil)] where given {
                throw ConfigError(setting: name, "\(name) needs --transport ws or wss")
            }
        }
        for a in bindAddresses where !SocketAddressCheck.isNumeric(a) {
            throw ConfigError(setting: "--bind-addr", "--bind-addr '\(a)' is not a numeric IP address")
        }
        for (name, value) in [("--max-clients", maxClients), ("--max-services", maxServices), ("--max-unauthenticated", maxUnauthenticated),
                                 ("--max-unauthenticated-per-source", maxUnauthenticatedPerSource)] {
            if let v = value, v < 1 { throw ConfigError(setting: name, "\(name) must be at least 1, got \(v)") }
        }
        _ = try ProxyRule.parseAll(exitAllow, flag: "--exit-allow")
        _ = try ProxyRule.parseAll(exitDeny, flag: "--exit-deny")
    }
}

extension TunnelServerConfig {
    /// The server's settings: `flags` over the TOML file at `file` (when given) over the
    /// defaults, checked as a whole. Pure apart from reading the files named, so a reload
    /// can call it again.
    public static func resolve(flags: TunnelServerFlags, file: String?) throws(ConfigError) -> Resolved<TunnelServerConfig> {
        try flags.check()
        var config = TunnelServerConfig()
        let fromFile = try loadFile(file, into: &config, TunnelConfigFile.loadServer)
        let log = flags.log.over(try fromFile?.logSettings() ?? LogSettings())
        var warnings: [String] = []
        guard let token = try flags.token.resolve(fromFile, warnings: &warnings) else {
            throw ConfigError(setting: "--token-file", "no token: give --token-file FILE or set CULVERT_TOKEN (make one with 'culvert token')")
        }
        config.token = token
        if !flags.listen.isEmpty { config.listen = flags.listen }
        flags.common.apply(transport: &config.transport, heartbeat: &config.heartbeat,
                           handshake: &config.handshakeTimeout, drain: &config.drainTimeout, threads: &config.threads)
        if let cert = flags.cert, let key = flags.key {
            config.certFile = cert
            config.keyFile = key
        }
        if config.certFile != nil && config.transport == .plain {
            throw ConfigError(setting: "transport", "a certificate needs transport tls")
        }
        if let wsPath = flags.wsPath { config.webSocket.path = wsPath }
        if let inner = flags.inner { config.webSocket.inner = inner }
        if let wsPing = flags.wsPing { config.webSocket.ping = wsPing }
        if !config.transport.isWebSocket && config.webSocket != TunnelWebSocket() {
            throw ConfigError(setting: "transport", "ws_path, inner and ws_ping need transport ws or wss")
        }
        if let allowPorts = flags.allowPorts { config.allowPorts = allowPorts }
        if !flags.bindAddresses.isEmpty { config.bindAddresses = flags.bindAddresses }
        if let maxClients = flags.maxClients { config.maxClients = maxClients }
        if let maxServices = flags.maxServices { config.maxServicesPerClient = maxServices }
        if let maxUnauthenticated = flags.maxUnauthenticated { config.maxUnauthenticated = maxUnauthenticated }
        if let perSource = flags.maxUnauthenticatedPerSource { config.maxUnauthenticatedPerSource = perSource }
        if flags.acceptProxy { config.acceptProxy = true }
        if flags.allowExit { config.allowExit = true }
        if !flags.exitAllow.isEmpty { config.exitAllow = try ProxyRule.parseAll(flags.exitAllow, flag: "--exit-allow") }
        if !flags.exitDeny.isEmpty { config.exitDeny = try ProxyRule.parseAll(flags.exitDeny, flag: "--exit-deny") }
        return Resolved(config: config, log: log, warnings: warnings, admin: fromFile?.admin ?? AdminFlags())
    }
}
