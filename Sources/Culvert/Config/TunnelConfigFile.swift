/// Reads `culvert server -c FILE` and `culvert client -c FILE` into the same config
/// models the flags fill; flags given on the command line override the file.
///
/// Server keys: listen, token, token_file, transport, cert, key, allow_ports, bind_addr,
/// max_clients, max_services, max_unauthenticated, max_unauthenticated_per_source, allow_exit,
/// exit_allow, exit_deny, handshake_timeout,
/// heartbeat_interval, heartbeat_misses, drain_timeout, threads, accept_proxy, ws_path, inner, ws_ping,
/// log_level, log_format, admin, admin_token_file.
/// Client keys: server (or servers, a list; each HOST[:PORT] or a ws:// or wss:// URL), headers, host_header, sni,
/// inner, ws_ping, proxy, token, token_file, transport, ca, fingerprint, pool, mux,
/// connect_timeout, reconnect_max, failback_interval, handshake_timeout, heartbeat_interval,
/// heartbeat_misses, drain_timeout, threads, udp_idle_timeout, udp_max_sessions, max_visitors,
/// dynamic, proxy_auth_file, no_auth, exit_allow, exit_deny, log_level,
/// log_format, admin, admin_token_file, and `[services.NAME]` tables
/// with remote_port, local, bind, compress, proxy_protocol (v1 or v2, tcp only), protocol (tcp or udp) — or secret = true, local, and optionally token or
/// token_file (the service's own token; default: the client's token).
public enum TunnelConfigFile {
    /// What both commands read besides their model: where the token and logs come from,
    /// and advice about the file's service token files.
    public struct Common {
        /// The config file itself, which errors about `token` and `token_file` name.
        public var path: String
        public var token: String?
        public var tokenFile: String?
        public var logLevel: String?
        public var logFormat: String?
        public var admin = AdminFlags()
        /// Whether the file named the server (client files).
        public var hasServer = false
        /// `proxy` (client files), resolved with the flags' environment.
        public var proxy: String?
        /// Advice found while reading, logged once there is a logger (a service token
        /// file that others can open).
        public var warnings: [String] = []
    }

    public static func loadServer(_ path: String, into config: inout TunnelServerConfig) throws(ConfigError) -> Common {
        let file = try ConfigFile(path: path)
        if let listen = try file.strings("listen") {
            var specs: [HostPort] = []
            for l in listen { if let spec = try file.parse("listen", l, HostPort.parse) { specs.append(spec) } }
            config.listen = specs
        }
        if let t = try file.parse("transport", try file.string("transport"), parseTransport) { config.transport = t }
        config.certFile = try file.string("cert") ?? config.certFile
        config.keyFile = try file.string("key") ?? config.keyFile
        if let ports = try file.parse("allow_ports", try file.string("allow_ports"), PortRanges.parse) { config.allowPorts = ports }
        if let binds = try file.strings("bind_addr") {
            for b in binds where !SocketAddressCheck.isNumeric(b) {
                throw file.error("bind_addr", "'\(b)' is not a numeric IP address")
            }
            config.bindAddresses = binds
        }
        config.maxClients = try file.int("max_clients", range: 1...100_000) ?? config.maxClients
        config.maxServicesPerClient = try file.int("max_services", range: 1...10_000) ?? config.maxServicesPerClient
        config.maxUnauthenticated = try file.int("max_unauthenticated", range: 1...100_000) ?? config.maxUnauthenticated
        config.maxUnauthenticatedPerSource = try file.int("max_unauthenticated_per_source", range: 1...100_000) ?? config.maxUnauthenticatedPerSource
        config.allowExit = try file.bool("allow_exit") ?? config.allowExit
        if let rules = try file.strings("exit_allow") { config.exitAllow = try file.rules("exit_allow", rules) }
        if let rules = try file.strings("exit_deny") { config.exitDeny = try file.rules("exit_deny", rules) }
        config.handshakeTimeout = try file.duration("handshake_timeout") ?? config.handshakeTimeout
        config.drainTimeout = try file.duration("drain_timeout") ?? config.drainTimeout
        config.threads = try file.int("threads", range: 1...1024) ?? config.threads
        config.heartbeat.interval = try file.duration("heartbeat_interval") ?? config.heartbeat.interval
        config.heartbeat.misses = try file.int("heartbeat_misses", range: 1...1000) ?? config.heartbeat.misses
        config.acceptProxy = try file.bool("accept_proxy") ?? config.acceptProxy
        if let path = try file.parse("ws_path", try file.string("ws_path"), parseWebSocketPath) { config.webSocket.path = path }
        if let inner = try file.parse("inner", try file.string("inner"), parseInner) { config.webSocket.inner = inner }
        if (try? file.string("ws_ping")) == "off" { config.webSocket.ping = nil } else if let ping = try file.duration("ws_ping") { config.webSocket.ping = ping }
        let common = try readCommon(file)
        try file.rejectUnknownKeys()
        if (config.certFile == nil) != (config.keyFile == nil) {
            throw ConfigError(file: path, key: config.certFile == nil ? "cert" : "key", message: "cert and key go together")
        }
        return common
    }

    public static func loadClient(_ path: String, into config: inout TunnelClientConfig) throws(ConfigError) -> Common {
        let file = try ConfigFile(path: path)
        let hasServer: Bool
        switch (try file.string("server"), try file.strings("servers")) {
        case (let server?, nil):
            config.endpoints = try file.parse("server", server, { (text) throws(InvalidValue) in try parseEndpoints(text) })!
            hasServer = true
        case (nil, let servers?):
            guard !servers.isEmpty else { throw file.error("servers", "empty: give at least one \"HOST[:PORT]\" or ws:// or wss:// URL") }
            do { config.endpoints = try parseEndpoints(servers) } catch { throw file.error("servers", error.description) }
            hasServer = true
        case (nil, nil):
            hasServer = false
        case (_?, _?):
            throw file.error("servers", "give server or servers, not both")
        }
        config.adoptWebSocketTransport()
        if let t = try file.parse("transport", try file.string("transport"), parseTransport) { config.transport = t }
        config.caFile = try file.string("ca") ?? config.caFile
        if let fp = try file.parse("fingerprint", try file.string("fingerprint"), parseFingerprint) { config.fingerprint = fp }
        config.pool = try file.int("pool", range: 0...64) ?? config.pool
        config.mux = try file.int("mux", range: 0...16) ?? config.mux
        config.connectTimeout = try file.duration("connect_timeout") ?? config.connectTimeout
        config.reconnectMax = try file.duration("reconnect_max") ?? config.reconnectMax
        if let interval = try file.duration("failback_interval") {
            guard interval > .zero else { throw file.error("failback_interval", "must be more than 0") }
            config.failbackInterval = interval
        }
        config.handshakeTimeout = try file.duration("handshake_timeout") ?? config.handshakeTimeout
        config.drainTimeout = try file.duration("drain_timeout") ?? config.drainTimeout
        config.threads = try file.int("threads", range: 1...1024) ?? config.threads
        config.heartbeat.interval = try file.duration("heartbeat_interval") ?? config.heartbeat.interval
        config.heartbeat.misses = try file.int("heartbeat_misses", range: 1...1000) ?? config.heartbeat.misses
        if let idle = try file.duration("udp_idle_timeout") {
            guard idle > .zero else { throw file.error("udp_idle_timeout", "must be more than 0") }
            config.udpIdleTimeout = idle
        }
        config.udpMaxSessions = try file.int("udp_max_sessions", range: 0...Int(Int32.max)) ?? config.udpMaxSessions
        config.maxVisitors = try file.int("max_visitors", range: 0...Int(Int32.max)) ?? config.maxVisitors
        if let dynamic = try file.strings("dynamic") {
            var listens: [HostPort] = []
            for d in dynamic { if let listen = try file.parse("dynamic", d, HostPort.parse) { listens.append(listen) } }
            config.dynamic = listens
        }
        config.proxyAuthFile = try file.string("proxy_auth_file") ?? config.proxyAuthFile
        config.proxyNoAuth = try file.bool("no_auth") ?? config.proxyNoAuth
        if let rules = try file.strings("exit_allow") { config.exitAllow = try file.rules("exit_allow", rules) }
        if let rules = try file.strings("exit_deny") { config.exitDeny = try file.rules("exit_deny", rules) }
        for h in try file.strings("headers") ?? [] {
            do { config.webSocket.headers.append(try WebSocketEgress.parseHeader(h)) } catch { throw file.error("headers", error.message) }
        }
        config.webSocket.hostHeader = try file.string("host_header") ?? config.webSocket.hostHeader
        config.webSocket.serverName = try file.string("sni") ?? config.webSocket.serverName
        if let inner = try file.parse("inner", try file.string("inner"), parseInner) { config.webSocket.inner = inner }
        if (try? file.string("ws_ping")) == "off" { config.webSocket.ping = nil } else if let ping = try file.duration("ws_ping") { config.webSocket.ping = ping }
        let proxy = try file.string("proxy")
        var services: [ServiceSpec] = []
        var warnings: [String] = []
        let compressAll = try file.bool("compress") ?? false
        for (name, table) in try file.tables("services") {
            let prefix = "services.\(name)."
            let secret = try file.bool("secret", in: table, prefix: prefix) ?? false
            let remote = try file.int("remote_port", range: 0...65535, in: table, prefix: prefix)
            if remote == nil && !secret {
                throw file.error(prefix + "remote_port", "missing (0 lets the server pick), or set secret = true")
            }
            guard let localText = try file.string("local", in: table, prefix: prefix) else {
                throw file.error(prefix + "local", "missing, e.g. local = \"127.0.0.1:22\"")
            }
            let local = try file.parse(prefix + "local", localText, HostPort.parse)!
            let bind = try file.string("bind", in: table, prefix: prefix)
            if let bind, !SocketAddressCheck.isNumeric(bind) {
                throw file.error(prefix + "bind", "'\(bind)' is not a numeric IP address")
            }
            let kind: ServiceSpec.Kind
            switch (try file.string("protocol", in: table, prefix: prefix) ?? "tcp", secret) {
            case ("tcp", false): kind = .tcp
            case ("tcp", true): kind = .secret
            case ("udp", false): kind = .udp
            case ("udp", true): throw file.error(prefix + "protocol", "secret services are TCP only")
            case (let other, _): throw file.error(prefix + "protocol", "'\(other)' is not tcp or udp")
            }
            var spec = ServiceSpec(name: name, kind: kind, bindHost: bind, remotePort: UInt16(remote ?? 0),
                                   localHost: local.host ?? "127.0.0.1", localPort: local.port)
            spec.compress = try file.bool("compress", in: table, prefix: prefix) ?? compressAll
            if spec.compress && secret { throw file.error(prefix + "compress", "secret services cannot be compressed") }
            spec.proxyProtocol = try file.parse(prefix + "proxy_protocol", try file.string("proxy_protocol", in: table, prefix: prefix),
                                                ForwardConfigFile.parseProxyVersion)
            if spec.proxyProtocol != nil && kind != .tcp {
                throw file.error(prefix + "proxy_protocol", "only TCP services with a public port send a PROXY header")
            }
            if !secret && (table["token"] != nil || table["token_file"] != nil) {
                throw file.error(prefix + "token", "only secret services have their own token")
            }
            spec.serviceToken = try file.serviceToken(in: table, prefix: prefix, warnings: &warnings)
            try file.rejectUnknownKeys(in: table, prefix: prefix)
            services.append(spec)
        }
        for text in try file.strings("reverse_proxy") ?? [] {
            do throws(ServiceSpec.ParseError) {
                services.append(try ServiceSpec.parse("proxy:" + text))
            } catch {
                throw file.error("reverse_proxy", "'\(text)': \(error.reason)")
            }
        }
        config.services += services
        var common = try readCommon(file)
        common.hasServer = hasServer
        common.warnings = warnings
        common.proxy = proxy
        try file.rejectUnknownKeys()
        if config.caFile != nil && config.fingerprint != nil {
            throw ConfigError(file: path, key: "fingerprint", message: "give ca or fingerprint, not both")
        }
        return common
    }

    private static func readCommon(_ file: ConfigFile) throws(ConfigError) -> Common {
        var common = Common(path: file.path, token: try file.string("token"), tokenFile: try file.string("token_file"),
                            logLevel: try file.string("log_level"), logFormat: try file.string("log_format"))
        common.admin = AdminFlags(address: try file.parse("admin", try file.string("admin"), HostPort.parse),
                                  tokenFile: try file.string("admin_token_file"))
        return common
    }

    /// A value that does not parse; the text names the value and the fix.
    public struct InvalidValue: Error, CustomStringConvertible {
        public let description: String
    }

    /// `ws_path`: as `--ws-path`.
    static func parseWebSocketPath(_ text: String) throws(InvalidValue) -> String {
        guard text.hasPrefix("/"), !text.contains(where: { !$0.isASCII || $0.isWhitespace || $0 == "?" }) else {
            throw InvalidValue(description: "'\(text)' must start with / and be ASCII without spaces or '?'")
        }
        return text
    }

    /// `inner`: auto, tls or plain.
    static func parseInner(_ text: String) throws(InvalidValue) -> TunnelWebSocket.Inner {
        guard let inner = TunnelWebSocket.Inner(rawValue: text) else { throw InvalidValue(description: "'\(text)' is not auto, tls or plain") }
        return inner
    }

    static func parseTransport(_ text: String) throws(InvalidValue) -> TunnelTransport {
        guard let t = TunnelTransport(rawValue: text) else { throw InvalidValue(description: "'\(text)' is not tls, plain, ws or wss") }
        return t
    }

    /// `HOST[:PORT],HOST[:PORT],…`: the client's servers in order of preference, each
    /// as `parseServer` reads it; one server may not be named twice.
    public static func parseServers(_ text: String) throws(InvalidValue) -> [HostPort] {
        try parseEndpoints(text).map { (endpoint) throws(InvalidValue) in
            guard endpoint.webSocket == nil else { throw InvalidValue(description: "'\(endpoint)' is a URL; expected HOST[:PORT]") }
            return endpoint.address
        }
    }

    /// `SERVER,SERVER,…` (the command line's <server> and the `server` key): the client's
    /// servers in order of preference; a comma in a URL's path is written %2C.
    public static func parseEndpoints(_ text: String) throws(InvalidValue) -> [ServerEndpoint] {
        try parseEndpoints(text.split(separator: ",", omittingEmptySubsequences: false).map(String.init))
    }

    /// The client's servers, each `HOST[:PORT]` as `parseServer` reads it or a ws:// or
    /// wss:// URL (its own transport and path); one address may not be named twice.
    public static func parseEndpoints(_ entries: [String]) throws(InvalidValue) -> [ServerEndpoint] {
        var endpoints: [ServerEndpoint] = []
        for entry in entries.map({ $0.trimmingWhitespace() }) {
            let endpoint: ServerEndpoint
            if WebSocketURL.looksLikeURL(entry) {
                do { endpoint = ServerEndpoint(try WebSocketURL.parse(entry), written: entry) } catch { throw InvalidValue(description: error.message) }
            } else {
                endpoint = ServerEndpoint(try parseServer(entry))
            }
            if endpoints.contains(where: { $0.address == endpoint.address }) {
                throw InvalidValue(description: "server '\(endpoint.address)' is named twice")
            }
            endpoints.append(endpoint)
        }
        return endpoints
    }

    /// `HOST[:PORT]` with 7000 as the default port; IPv6 in brackets. The one place that
    /// reads a server address (the command line and both config keys come here).
    public static func parseServer(_ text: String) throws(InvalidValue) -> HostPort {
        if text.hasPrefix("[") && text.hasSuffix("]") { return HostPort(host: String(text.dropFirst().dropLast()), port: 7000) }
        if text.contains(":") {
            do {
                let server = try HostPort.parse(text)
                try server.checkConnectable()
                return server
            } catch { throw InvalidValue(description: error.description) }
        }
        guard !text.isEmpty, text.allSatisfy({ $0.isLetter || $0.isNumber || ".-_".contains($0) }) else {
            throw InvalidValue(description: "invalid server address '\(text)'")
        }
        return HostPort(host: text, port: 7000)
    }
}

/// `sha256:HEX` (colons between bytes allowed) to 32 bytes.
public func parseFingerprint(_ text: String) throws(TunnelConfigFile.InvalidValue) -> [UInt8] {
    let lower = text.lowercased()
    guard lower.hasPrefix("sha256:") else { throw .init(description: "fingerprint '\(text)' must start with sha256:") }
    let hex = Array(lower.dropFirst(7).filter { $0 != ":" })
    guard hex.count == 64 else { throw .init(description: "fingerprint '\(text)' must have 64 hex digits after sha256:") }
    var out: [UInt8] = []
    for i in stride(from: 0, to: 64, by: 2) {
        guard let byte = UInt8(String(hex[i...i + 1]), radix: 16) else {
            throw .init(description: "fingerprint '\(text)' is not hexadecimal")
        }
        out.append(byte)
    }
    return out
}
