/// What `culvert client` was given on the command line; nil or empty when a flag was not
/// given, so that the config file, and then `TunnelClientConfig`'s defaults, apply.
public struct TunnelClientFlags: Sendable {
    /// The servers in order of preference (`HOST1[:PORT],ws://HOST2/PATH,…`); empty: not given.
    public var endpoints: [ServerEndpoint] = []
    /// The servers' addresses; setting them makes each a HOST:PORT server.
    public var servers: [HostPort] {
        get { endpoints.map(\.address) }
        set { endpoints = newValue.map(ServerEndpoint.init) }
    }
    /// The preferred server, when any is given; setting it makes it the only one.
    public var server: HostPort? {
        get { servers.first }
        set { servers = newValue.map { [$0] } ?? [] }
    }
    /// `-R`, in command line order.
    public var services: [ServiceSpec] = []
    /// `--secret`, in command line order.
    public var secrets: [ServiceSpec] = []
    public var serviceTokenFile: String?
    /// Deflate the `-R` services.
    public var compress = false
    /// Write a PROXY header naming the visitor to the local service of each TCP `-R`.
    public var sendProxy: ProxyProtocolVersion?
    public var visit: String?
    /// `-L`, the local end of `--visit`.
    public var localListen: HostPort?
    public var token = TokenFlags()
    public var common = TunnelCommonFlags()
    public var log = LogFlags()
    public var ca: String?
    public var fingerprint: [UInt8]?
    public var pool: Int?
    public var mux: Int?
    public var connectTimeout: Duration?
    public var reconnectMax: Duration?
    public var failbackInterval: Duration?
    public var udpIdleTimeout: Duration?
    public var udpMaxSessions: Int?
    public var maxVisitors: Int?
    /// `--header`, `--host-header`, `--sni`, `--inner`: with a WebSocket URL among the servers only.
    public var headers: [String] = []
    public var hostHeader: String?
    public var sni: String?
    public var inner: TunnelWebSocket.Inner?
    /// `--ws-ping`: nil not given, `.some(nil)` off.
    public var wsPing: Duration??
    /// `--proxy` as given, and the environment `--proxy env` reads.
    public var proxy: String?
    public var proxyEnvironment: [String: String] = [:]
    /// `-D`, in command line order.
    public var dynamic: [HostPort] = []
    public var proxyAuthFile: String?
    public var noAuth = false
    public var exitAllow: [String] = []
    public var exitDeny: [String] = []

    public init() {}

    /// The rules the flags must follow whatever the file says (`withFile`: whether a config
    /// file may supply the server and the services); `resolve` checks them first, and a
    /// command line parser may check them early to report them as usage.
    public func check(withFile: Bool) throws(ConfigError) {
        try common.check()
        if let pool, pool < 0 || pool > 64 { throw ConfigError(setting: "--pool", "--pool must be between 0 and 64, got \(pool)") }
        if let mux, mux < 0 || mux > 16 { throw ConfigError(setting: "--mux", "--mux must be between 0 and 16, got \(mux)") }
        if let failbackInterval, failbackInterval <= .zero {
            throw ConfigError(setting: "--failback-interval", "--failback-interval must be more than 0")
        }
        if let udpIdleTimeout, udpIdleTimeout <= .zero {
            throw ConfigError(setting: "--udp-idle-timeout", "--udp-idle-timeout must be more than 0")
        }
        if let udpMaxSessions, udpMaxSessions < 0 {
            throw ConfigError(setting: "--udp-max-sessions", "--udp-max-sessions must be 0 (no limit) or more, got \(udpMaxSessions)")
        }
        if let maxVisitors, maxVisitors < 0 {
            throw ConfigError(setting: "--max-visitors", "--max-visitors must be 0 (no limit) or more, got \(maxVisitors)")
        }
        if ca != nil && fingerprint != nil { throw ConfigError(setting: "--fingerprint", "give --ca or --fingerprint, not both") }
        if (ca != nil || fingerprint != nil) && common.transport == .plain {
            throw ConfigError(setting: ca != nil ? "--ca" : "--fingerprint", "--ca and --fingerprint need --transport tls")
        }
        try checkWebSocket()
        if proxyAuthFile != nil && noAuth {
            throw ConfigError(setting: "--no-auth", "--no-auth and --proxy-auth-file contradict each other: give one")
        }
        _ = try ProxyRule.parseAll(exitAllow, flag: "--exit-allow")
        _ = try ProxyRule.parseAll(exitDeny, flag: "--exit-deny")
        if visit != nil {
            if !dynamic.isEmpty { throw ConfigError(setting: "-D", "--visit cannot be combined with -D") }
            if localListen == nil { throw ConfigError(setting: "-L", "--visit needs -L [BIND:]PORT to listen on") }
            if !services.isEmpty || !secrets.isEmpty {
                throw ConfigError(setting: "--visit", "--visit cannot be combined with -R or --secret")
            }
            if servers.count > 1 { throw ConfigError(setting: "<server>", "--visit goes through one server; give one HOST[:PORT]") }
        } else if localListen != nil {
            throw ConfigError(setting: "-L", "-L only works with --visit NAME")
        }
        if sendProxy != nil && !services.isEmpty && !services.contains(where: { $0.kind == .tcp }) {
            throw ConfigError(setting: "--send-proxy", "--send-proxy applies to TCP -R services, and every -R given is UDP")
        }
        if !withFile {
            if endpoints.isEmpty {
                throw ConfigError(setting: "<server>", "missing <server>: give HOST[:PORT], ws://HOST[:PORT]/PATH or wss://… of the culvert server")
            }
            if services.isEmpty && secrets.isEmpty && visit == nil && dynamic.isEmpty {
                throw ConfigError(setting: "-R", "nothing to expose: give at least one -R [BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT or --secret NAME=HOST:PORT (or -D [BIND:]PORT for a proxy through the server)")
            }
        }
    }
}

extension TunnelClientFlags {
    /// The WebSocket options go with a ws:// or wss:// server, whose scheme names its
    /// transport; `--transport` is for the servers given as HOST:PORT.
    private func checkWebSocket() throws(ConfigError) {
        let urls = endpoints.compactMap(\.webSocket)
        guard !urls.isEmpty else {
            for (name, given) in [("--header", !headers.isEmpty), ("--host-header", hostHeader != nil), ("--sni", sni != nil),
                                  ("--inner", inner != nil), ("--ws-ping", wsPing != nil)] where given {
                throw ConfigError(setting: name, "\(name) needs the server as a ws:// or wss:// URL")
            }
            return
        }
        if urls.count == endpoints.count, let transport = common.transport,
           let other = endpoints.first(where: { $0.transport != transport }) {
            throw ConfigError(setting: "--transport", "--transport \(transport.rawValue) contradicts the server URL \(other); the URL's scheme sets the transport")
        }
        if !urls.contains(where: \.secure) {
            // With HOST:PORT servers too, --ca and --fingerprint are theirs (transport tls).
            let forTLS = urls.count < endpoints.count
            for (name, given) in [("--sni", sni != nil), ("--ca", ca != nil && !forTLS), ("--fingerprint", fingerprint != nil && !forTLS)] where given {
                throw ConfigError(setting: name, "\(name) needs a wss:// server URL (ws:// has no TLS of its own)")
            }
        }
        for h in headers { _ = try WebSocketEgress.parseHeader(h) }
    }
}

extension TunnelClientConfig {
    /// The client's settings: `flags` over the TOML file at `file` (when given) over the
    /// defaults, checked as a whole. The file's services come first (sorted by name), then
    /// `-R`, then `--secret`; each gets its id from that order. Pure apart from reading the
    /// files named, so a reload can call it again.
    public static func resolve(flags: TunnelClientFlags, file: String?) throws(ConfigError) -> Resolved<TunnelClientConfig> {
        try flags.check(withFile: file != nil)
        var config = TunnelClientConfig()
        let fromFile = try loadFile(file, into: &config, TunnelConfigFile.loadClient)
        let log = flags.log.over(try fromFile?.logSettings() ?? LogSettings())
        var warnings: [String] = []
        guard let token = try flags.token.resolve(fromFile, warnings: &warnings) else {
            throw ConfigError(setting: "--token-file", "no token: give --token-file FILE or set CULVERT_TOKEN")
        }
        config.token = token
        if !flags.endpoints.isEmpty {
            config.endpoints = flags.endpoints
            config.adoptWebSocketTransport()
        } else if fromFile?.hasServer != true {
            throw ConfigError(setting: "<server>", "missing <server>: give HOST[:PORT] or server = \"HOST:PORT\" in the config file")
        }
        warnings += fromFile?.warnings ?? []
        let serviceToken = try flags.serviceTokenFile.map { path throws(ConfigError) in
            try readServiceToken(at: path, setting: "--service-token-file", warnings: &warnings)
        }
        config.services += flags.services.map { spec in
            var s = spec
            s.compress = flags.compress && spec.kind != .proxy
            if s.kind == .tcp { s.proxyProtocol = flags.sendProxy }
            return s
        }
        config.services += flags.secrets.map { spec in
            var s = spec
            s.serviceToken = serviceToken
            return s
        }
        for i in config.services.indices { config.services[i].id = UInt32(i) }
        try checkDistinct(config.services)
        if let name = flags.visit, let listen = flags.localListen {
            if config.servers.count > 1 {
                throw ConfigError(setting: "servers", "--visit goes through one server; the config file names \(config.servers.count)")
            }
            config.visit = VisitSpec(name: name, listen: listen, serviceToken: serviceToken)
        } else if config.services.isEmpty && flags.dynamic.isEmpty && config.dynamic.isEmpty {
            throw ConfigError(setting: "-R", "nothing to expose: give -R, --secret or [services.NAME] in the config file (or -D for a proxy through the server)")
        }
        flags.common.apply(transport: &config.transport, heartbeat: &config.heartbeat,
                           handshake: &config.handshakeTimeout, drain: &config.drainTimeout, threads: &config.threads)
        if let ca = flags.ca { config.caFile = ca; config.fingerprint = nil }
        if let fingerprint = flags.fingerprint { config.fingerprint = fingerprint; config.caFile = nil }
        if let pool = flags.pool { config.pool = pool }
        if let mux = flags.mux { config.mux = mux }
        if let connectTimeout = flags.connectTimeout { config.connectTimeout = connectTimeout }
        if let reconnectMax = flags.reconnectMax { config.reconnectMax = reconnectMax }
        if let failbackInterval = flags.failbackInterval { config.failbackInterval = failbackInterval }
        if let udpIdleTimeout = flags.udpIdleTimeout { config.udpIdleTimeout = udpIdleTimeout }
        if let udpMaxSessions = flags.udpMaxSessions { config.udpMaxSessions = udpMaxSessions }
        if let maxVisitors = flags.maxVisitors { config.maxVisitors = maxVisitors }
        config.webSocket.headers += try flags.headers.map { (h) throws(ConfigError) in try WebSocketEgress.parseHeader(h) }
        if let hostHeader = flags.hostHeader { config.webSocket.hostHeader = hostHeader }
        if let sni = flags.sni { config.webSocket.serverName = sni }
        if let inner = flags.inner { config.webSocket.inner = inner }
        if let wsPing = flags.wsPing { config.webSocket.ping = wsPing }
        if !config.transport.isWebSocket && !config.endpoints.contains(where: { $0.webSocket != nil }) && config.webSocket != TunnelWebSocket() {
            throw ConfigError(setting: "server", "headers, host_header, sni, inner and ws_ping need the server as a ws:// or wss:// URL")
        }
        if let proxy = flags.proxy ?? fromFile?.proxy {
            config.proxy = try ProxyRoute.parse(proxy, environment: flags.proxyEnvironment, server: config.server)
            if proxy == "env" { config.environmentProxy = try EnvironmentProxy(flags.proxyEnvironment) }
        }
        if config.transport == .plain && (config.caFile != nil || config.fingerprint != nil) {
            throw ConfigError(setting: "transport", "ca and fingerprint need transport tls")
        }
        try config.applyProxyFlags(flags)
        return Resolved(config: config, log: log, warnings: warnings, admin: fromFile?.admin ?? AdminFlags())
    }
}

/// Two services asking for the same public port (same protocol and bind address), or two
/// secret services of one name, would have the server refuse the second after the first
/// is exposed; found here, before connecting, as a usage error.
private func checkDistinct(_ services: [ServiceSpec]) throws(ConfigError) {
    var ports: [String: String] = [:]
    var secrets: Set<String> = []
    for s in services {
        switch s.kind {
        case .secret:
            guard secrets.insert(s.name).inserted else {
                throw ConfigError(setting: "--secret", "two secret services are named '\(s.name)'; give each its own name")
            }
        case .tcp, .udp, .proxy:
            guard s.remotePort != 0 else { continue }
            let key = "\(s.kind == .udp ? "udp" : "tcp") \(s.bindHost ?? "*") \(s.remotePort)"
            if let first = ports[key] {
                throw ConfigError(setting: "-R", "services '\(first)' and '\(s.name)' both ask for \(s.kind.rawValue) port \(s.remotePort); give each service its own remote port (0 lets the server pick)")
            }
            ports[key] = s.name
        }
    }
}
