#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Culvert
import Logging

/// Where the shared token comes from, in order: --token-file, CULVERT_TOKEN, --token.
struct TokenOptions: ParsableArguments {
    @Option(help: "File holding the shared token (first line; keep it mode 600).")
    var tokenFile: String?

    @Option(help: "The shared token itself. Visible in the process list: prefer --token-file or CULVERT_TOKEN.")
    var token: String?

    /// The token's sources as given, with CULVERT_TOKEN read from the environment; set
    /// but empty counts as given, so that the token rules refuse it by name.
    var flags: TokenFlags {
        TokenFlags(tokenFile: tokenFile, environment: getenv("CULVERT_TOKEN").map { String(cString: $0) }, token: token)
    }
}

extension TunnelTransport: ExpressibleByArgument {}
extension TunnelWebSocket.Inner: ExpressibleByArgument {}

/// `culvert token`: prints a new random token.
struct TokenCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token",
        abstract: "Print a new random token (32 bytes from the system CSPRNG, base64url).")

    func run() throws {
        print(randomToken())
    }
}

/// Shared flags of server and client. Each is optional so a config file can supply it;
/// the defaults live in the config models.
struct TunnelCommonOptions: ParsableArguments {
    @Option(name: [.customShort("c"), .customLong("config")],
            help: ArgumentHelp("TOML config file; flags given on the command line override it.", valueName: "file"))
    var config: String?

    @Option(help: "tls (default; TLS 1.3, a PSK from the token unless certificates are set), plain (both ends must ask; not encrypted), or on the server ws / wss (in a WebSocket; clients give a ws:// or wss:// URL).")
    var transport: TunnelTransport?

    @Option(help: "Heartbeat interval (default: 5s).", transform: parseDuration)
    var heartbeatInterval: Duration?

    @Option(help: "Missed heartbeats after which the peer counts as dead (default: 3).")
    var heartbeatMisses: Int?

    @Option(help: "Time a new connection gets to finish its handshake (default: 10s).", transform: parseDuration)
    var handshakeTimeout: Duration?

    @Option(help: "On SIGINT/SIGTERM, time tunneled connections get to finish (default: 30s).", transform: parseDuration)
    var drainTimeout: Duration?

    @Option(help: "Event loop threads (default: the number of cores).")
    var threads: Int?

    var flags: TunnelCommonFlags {
        var flags = TunnelCommonFlags()
        flags.transport = transport
        flags.heartbeatInterval = heartbeatInterval
        flags.heartbeatMisses = heartbeatMisses
        flags.handshakeTimeout = handshakeTimeout
        flags.drainTimeout = drainTimeout
        flags.threads = threads
        return flags
    }
}

/// `culvert server`
struct ServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "server",
        abstract: "Accept tunnel clients and expose their services on public ports.",
        discussion: """
            Clients authenticate with the shared token (never sent: both sides prove it \
            with HMAC-SHA256 over fresh nonces). Prints 'listening tunnel ADDR' per \
            listening address. The token comes from --token-file, CULVERT_TOKEN, --token \
            or the config file. With --allow-exit, clients' -D proxies connect out from \
            here: not to loopback, link-local or this host's addresses unless an \
            --exit-allow network names them; --exit-deny always wins.
            """)

    @Option(name: .customLong("listen"), parsing: .singleValue,
            help: "Address for tunnel clients; repeat for several (default: :7000, all addresses).",
            transform: parseHostPort)
    var listen: [HostPort] = []

    @OptionGroup var token: TokenOptions
    @OptionGroup var common: TunnelCommonOptions

    @Option(help: "Server certificate chain (PEM) for X.509 TLS instead of the token PSK.")
    var cert: String?

    @Option(help: "Private key (PEM) for --cert.")
    var key: String?

    @Option(help: "Ports services may use, e.g. 20000-20100,8080 (default: 1024-65535).", transform: parsePortRanges)
    var allowPorts: PortRanges?

    @Option(name: .customLong("bind-addr"), parsing: .singleValue,
            help: "Address services may bind; repeat for several (default: any; services without BIND get the first, or else 0.0.0.0 and :: on one port).")
    var bindAddr: [String] = []

    @Option(help: "Most clients connected at once (default: 64).")
    var maxClients: Int?

    @Option(help: "Most services per client (default: 32).")
    var maxServices: Int?

    @Option(help: "Most connections still in their handshake from addresses without a session (default: 128; addresses with one have as many again).")
    var maxUnauthenticated: Int?

    @Option(help: "Most connections still in their handshake from one IPv4 address or IPv6 /64 without a session (default: 8).")
    var maxUnauthenticatedPerSource: Int?

    @Option(help: "With --transport ws/wss: the path that upgrades (default: /); any other gets 404.")
    var wsPath: String?

    @Option(help: "With --transport ws/wss: auto (default: the token's TLS-PSK inside the WebSocket, left out when a client proves the wss TLS reaches this server unbroken), tls (always) or plain.")
    var inner: TunnelWebSocket.Inner?

    @Option(help: "With --transport ws/wss: ping each tunnel WebSocket this often and drop it when a ping goes unanswered until the next (default: 20s; off).",
            transform: parseWebSocketPing)
    var wsPing: WebSocketPing?

    @Flag(help: "Visitors of exposed ports must start with a PROXY protocol header (v1 or v2, e.g. haproxy send-proxy in front of the server), read within the handshake timeout; its source is the visitor's address that clients see and pass on.")
    var acceptProxy = false

    @Flag(help: "Be the exit of clients' -D proxies (off: their requests are refused).")
    var allowExit = false

    @Option(parsing: .singleValue, help: ArgumentHelp("Destination -D requests may reach from here (repeatable; forms as culvert proxy --allow).", valueName: "DEST"))
    var exitAllow: [String] = []

    @Option(parsing: .singleValue, help: ArgumentHelp("Destination -D requests may not reach from here (repeatable; wins).", valueName: "DEST"))
    var exitDeny: [String] = []

    @OptionGroup var logging: LoggingOptions
    @OptionGroup var admin: AdminOptions

    var flags: TunnelServerFlags {
        var flags = TunnelServerFlags()
        flags.listen = listen
        flags.token = token.flags
        flags.common = common.flags
        flags.log = logging.flags
        flags.cert = cert
        flags.key = key
        flags.allowPorts = allowPorts
        flags.bindAddresses = bindAddr
        flags.maxClients = maxClients
        flags.maxServices = maxServices
        flags.maxUnauthenticated = maxUnauthenticated
        flags.maxUnauthenticatedPerSource = maxUnauthenticatedPerSource
        flags.wsPath = wsPath
        flags.inner = inner
        flags.wsPing = wsPing.map { $0.interval }
        flags.acceptProxy = acceptProxy
        flags.allowExit = allowExit
        flags.exitAllow = exitAllow
        flags.exitDeny = exitDeny
        return flags
    }

    func validate() throws {
        try usage { try flags.check() }
    }

    func run() throws {
        let (flags, file) = (self.flags, common.config)
        var resolved = try usage { try TunnelServerConfig.resolve(flags: flags, file: file) }.holdingToken()
        let (adminSettings, adminWarnings) = try admin.settings(command: "server", file: resolved.admin)
        resolved.warnings += adminWarnings
        let config = resolved.config
        let logger = resolved.makeLogger()
        let status = ServiceRunner.run(threads: config.threads, drainTimeout: config.drainTimeout, logger: logger,
                                       admin: adminSettings) { group, _ in
            try await TunnelServer.start(config: config, group: group, logger: logger, configPath: file) { () throws(ConfigError) in
                try TunnelServerConfig.resolve(flags: flags, file: file).config
            }
        }
        if status != 0 { throw ExitCode(status) }
    }
}

/// `culvert client`
struct ClientCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "client",
        abstract: "Expose local services through a culvert server (like ssh -R).",
        discussion: """
            -R [udp:][BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT exposes LOCAL_HOST:LOCAL_PORT \
            (TCP, or UDP with the udp: prefix) on the server's REMOTE_PORT (0: the server \
            picks). Prints 'exposed tcp|udp ADDR -> LOCAL' once per service when it is \
            reachable. -D [BIND:]PORT runs a SOCKS5 and HTTP proxy here whose connections \
            leave at the server (which needs --allow-exit); -R proxy:[BIND:]REMOTE_PORT runs \
            one on the server's port whose connections leave here. Ready lines: \
            'listening proxy ADDR', 'exposed proxy ADDR'. Reconnects with backoff forever; with several servers \
            (HOST1,HOST2) it moves to the next when one is lost, prints its 'exposed' \
            lines again naming the new server, and moves back to an earlier one when it \
            answers again; \
            exits 1 on authentication failure or when a service is refused at first start.
            """)

    @Argument(help: ArgumentHelp(
        "Server address, HOST[:PORT] (default port 7000; may come from the config file), or ws://HOST[:PORT]/PATH or wss://… for a server on --transport ws/wss; several, comma-separated (each with its own transport), are tried in order, and the client moves back to an earlier one when it answers again.",
        valueName: "server"),
              transform: parseServerArgument)
    var server: [ServerEndpoint]?

    @Option(name: .customShort("R"), parsing: .singleValue,
            help: "Service to expose: [udp:][BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT, or proxy:[BIND:]REMOTE_PORT; repeat for several.",
            transform: parseServiceSpec)
    var services: [ServiceSpec] = []

    @Option(name: .customLong("secret"), parsing: .singleValue,
            help: "Secret service with no public port: NAME=LOCAL_HOST:LOCAL_PORT; visitors reach it with --visit NAME. Repeat for several.",
            transform: parseSecretSpec)
    var secrets: [ServiceSpec] = []

    @Option(name: .customShort("D"), parsing: .singleValue,
            help: ArgumentHelp("SOCKS5 and HTTP proxy here whose connections leave at the server, [BIND:]PORT (default bind: 127.0.0.1); repeat for several.", valueName: "[BIND:]PORT"),
            transform: parseHostPort)
    var dynamic: [HostPort] = []

    @Option(help: "File of 'user:password' lines: clients of the -D and -R proxy: proxies must authenticate.")
    var proxyAuthFile: String?

    @Flag(help: "Allow an unauthenticated -D or -R proxy: proxy on a non-loopback address.")
    var noAuth = false

    @Option(parsing: .singleValue, help: ArgumentHelp("Destination -R proxy: connections may reach from here (repeatable; forms as culvert proxy --allow).", valueName: "DEST"))
    var exitAllow: [String] = []

    @Option(parsing: .singleValue, help: ArgumentHelp("Destination -R proxy: connections may not reach from here (repeatable; wins).", valueName: "DEST"))
    var exitDeny: [String] = []

    @Option(help: "File with the token of the secret services (--secret) or of the visited one (--visit); default: the client's token.")
    var serviceTokenFile: String?

    @Flag(help: "Deflate the data channels of the -R services (zlib, flushed per write).")
    var compress = false

    @Option(help: ArgumentHelp("Write a PROXY protocol header (v1 text or v2 binary) with the visitor's address and port to the local service of each TCP -R before the visitor's bytes.", valueName: "v1|v2"))
    var sendProxy: ProxyProtocolVersion?

    @Option(help: "Visit the secret service NAME instead of exposing services; needs -L.")
    var visit: String?

    @Option(name: .customShort("L"), help: "With --visit: local address to listen on, [BIND:]PORT (default bind: 127.0.0.1).",
            transform: parseHostPort)
    var localListen: HostPort?

    @OptionGroup var token: TokenOptions
    @OptionGroup var common: TunnelCommonOptions

    @Option(help: "CA certificate (PEM) to verify a server that uses --cert; the server name is checked.")
    var ca: String?

    @Option(help: "Pinned SHA-256 fingerprint of the server certificate: sha256:HEX.", transform: parseFingerprintArgument)
    var fingerprint: [UInt8]?

    @Option(help: "Pre-opened data channels kept ready (default: 2); with --mux they serve only secret services.")
    var pool: Int?

    @Option(help: ArgumentHelp("Data channels that carry TCP visitors as multiplexed streams (default: 1, at most 16); 0: a dedicated data channel per visitor (splices with --transport plain).", valueName: "N"))
    var mux: Int?

    @Option(help: "Time allowed to connect to the server or a local service (default: 5s).", transform: parseDuration)
    var connectTimeout: Duration?

    @Option(help: "Longest wait between reconnect attempts (default: 30s).", transform: parseDuration)
    var reconnectMax: Duration?

    @Option(help: "With several servers: how often, while a later one serves, the earlier ones are tried to move back (default: 15s).",
            transform: parseDuration)
    var failbackInterval: Duration?

    @Option(help: "End a UDP visitor's session to the local service after this long without a datagram either way (default: 60s).",
            transform: parseDuration)
    var udpIdleTimeout: Duration?

    @Option(help: ArgumentHelp(
        "Sessions (visitor addresses) each UDP service may hold; datagrams from new visitors beyond them are dropped and counted (default: an equal share of half the descriptors free at start, at most 10,000 in all; 0: no limit).",
        valueName: "N"))
    var udpMaxSessions: Int?

    @Option(help: ArgumentHelp(
        "Visitors each TCP or secret service relays at once; visitors beyond them are refused and counted (default: an equal share of the descriptors free at start, less a reserve for the control channel and carriers; 0: no limit).",
        valueName: "N"))
    var maxVisitors: Int?

    @Option(name: .customLong("header"), help: "Extra header of the WebSocket upgrade request, 'Name: value' (repeatable; ws:// and wss:// servers).")
    var headers: [String] = []

    @Option(help: "Host header of the WebSocket upgrade instead of the URL's (a CDN's edge name).")
    var hostHeader: String?

    @Option(help: "TLS server name (SNI and certificate check) instead of the URL's host (wss:// servers).")
    var sni: String?

    @Option(help: "With a ws:// or wss:// server: auto (default: the token's TLS-PSK inside the WebSocket, left out when the wss TLS provably reaches the server unbroken), tls (always) or plain (the server must agree).")
    var inner: TunnelWebSocket.Inner?

    @Option(help: "Ping each tunnel WebSocket this often and drop it when a ping goes unanswered until the next (default: 20s; off).",
            transform: parseWebSocketPing)
    var wsPing: WebSocketPing?

    @Option(help: "Reach the server through a proxy: http://[USER:PASS@]HOST:PORT (CONNECT), socks5://[USER:PASS@]HOST:PORT, or env (HTTPS_PROXY and NO_PROXY).")
    var proxy: String?

    @OptionGroup var logging: LoggingOptions
    @OptionGroup var admin: AdminOptions

    var flags: TunnelClientFlags {
        var flags = TunnelClientFlags()
        flags.endpoints = server ?? []
        flags.headers = headers
        flags.hostHeader = hostHeader
        flags.sni = sni
        flags.inner = inner
        flags.wsPing = wsPing.map { $0.interval }
        flags.proxy = proxy
        // Read always: `proxy = "env"` may come from the config file.
        for name in ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"] {
            flags.proxyEnvironment[name] = getenv(name).map { String(cString: $0) }
        }
        flags.services = services
        flags.secrets = secrets
        flags.serviceTokenFile = serviceTokenFile
        flags.compress = compress
        flags.sendProxy = sendProxy
        flags.visit = visit
        flags.localListen = localListen
        flags.token = token.flags
        flags.common = common.flags
        flags.log = logging.flags
        flags.ca = ca
        flags.fingerprint = fingerprint
        flags.pool = pool
        flags.mux = mux
        flags.connectTimeout = connectTimeout
        flags.reconnectMax = reconnectMax
        flags.failbackInterval = failbackInterval
        flags.udpIdleTimeout = udpIdleTimeout
        flags.udpMaxSessions = udpMaxSessions
        flags.maxVisitors = maxVisitors
        flags.dynamic = dynamic
        flags.proxyAuthFile = proxyAuthFile
        flags.noAuth = noAuth
        flags.exitAllow = exitAllow
        flags.exitDeny = exitDeny
        return flags
    }

    func validate() throws {
        try usage { try flags.check(withFile: common.config != nil) }
    }

    func run() throws {
        let (flags, file) = (self.flags, common.config)
        var resolved = try usage { try TunnelClientConfig.resolve(flags: flags, file: file) }.holdingToken()
        let (adminSettings, adminWarnings) = try admin.settings(command: "client", file: resolved.admin)
        resolved.warnings += adminWarnings
        let config = resolved.config
        let logger = resolved.makeLogger()
        let status = ServiceRunner.run(threads: config.threads, drainTimeout: config.drainTimeout, logger: logger,
                                       admin: adminSettings) { group, control in
            if let visit = config.visit {
                return try await VisitorListener.start(config: config, name: visit.name, serviceToken: visit.serviceToken,
                                                       listen: visit.listen, group: group, logger: logger)
            }
            return try await TunnelClient.start(config: config, group: group, logger: logger, control: control,
                                                configPath: file) { () throws(ConfigError) in
                try TunnelClientConfig.resolve(flags: flags, file: file).config
            }
        }
        if status != 0 { throw ExitCode(status) }
    }
}

func parseSecretSpec(_ text: String) throws -> ServiceSpec {
    do { return try ServiceSpec.parseSecret(text) } catch { throw ValidationError(error.description) }
}

func parseServerAddress(_ text: String) throws -> HostPort {
    do { return try TunnelConfigFile.parseServer(text) } catch { throw ValidationError(error.description) }
}

/// The client's <server>: HOST[:PORT] or a ws:// or wss:// URL (which picks that server's
/// transport), or several, comma-separated, in order of preference.
func parseServerArgument(_ text: String) throws -> [ServerEndpoint] {
    do { return try TunnelConfigFile.parseEndpoints(text) } catch { throw ValidationError(error.description) }
}

func parseServiceSpec(_ text: String) throws -> ServiceSpec {
    do { return try ServiceSpec.parse(text) } catch { throw ValidationError(error.description) }
}

func parsePortRanges(_ text: String) throws -> PortRanges {
    do { return try PortRanges.parse(text) } catch { throw ValidationError(error.description) }
}

func parseFingerprintArgument(_ text: String) throws -> [UInt8] {
    do { return try parseFingerprint(text) } catch { throw ValidationError(error.description) }
}
