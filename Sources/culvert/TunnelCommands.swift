#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Culvert
import Logging
import Reactor

/// Where the shared token comes from, in order: --token-file, CULVERT_TOKEN, --token.
struct TokenOptions: ParsableArguments {
    @Option(help: "File holding the shared token (first line; keep it mode 600).")
    var tokenFile: String?

    @Option(help: "The shared token itself. Visible in the process list: prefer --token-file or CULVERT_TOKEN.")
    var token: String?

    /// The token, or nil when none was given anywhere.
    func resolve(logger: Logger) throws -> String? {
        if let tokenFile { return try readToken(from: tokenFile, option: "--token-file") }
        if let env = getenv("CULVERT_TOKEN"), case let token = String(cString: env), !token.isEmpty {
            return token
        }
        if let token {
            logger.warning("--token is visible to every user in the process list; use --token-file or CULVERT_TOKEN")
            return token
        }
        return nil
    }
}

/// The first line of a token file, trimmed; `option` names where the path came from.
func readToken(from path: String, option: String) throws -> String {
    do { return try TextFile.token(at: path, what: option) } catch { throw ValidationError(error.description) }
}

extension TunnelTransport: ExpressibleByArgument {}

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

    @Option(help: "tls (default; TLS 1.3, a PSK from the token unless certificates are set) or plain (both ends must ask; not encrypted).")
    var transport: TunnelTransport?

    @Option(help: "Heartbeat interval (default: 5s).", transform: parseDuration)
    var heartbeatInterval: Duration?

    @Option(help: "Missed heartbeats after which the peer counts as dead (default: 3).")
    var heartbeatMisses: Int?

    @Option(help: "Time a new connection gets to finish its handshake (default: 10s).", transform: parseDuration)
    var handshakeTimeout: Duration?

    @Option(help: "On SIGINT/SIGTERM, time tunneled connections get to finish (default: 30s).", transform: parseDuration)
    var drainTimeout: Duration?

    func validate() throws {
        if let m = heartbeatMisses, m < 1 { throw ValidationError("--heartbeat-misses must be at least 1") }
        if heartbeatInterval == .zero { throw ValidationError("--heartbeat-interval must be more than 0") }
        if handshakeTimeout == .zero { throw ValidationError("--handshake-timeout must be more than 0") }
    }

    func apply(transport t: inout TunnelTransport, heartbeat: inout Heartbeat, handshake: inout Duration, drain: inout Duration) {
        if let transport { t = transport }
        if let heartbeatInterval { heartbeat.interval = heartbeatInterval }
        if let heartbeatMisses { heartbeat.misses = heartbeatMisses }
        if let handshakeTimeout { handshake = handshakeTimeout }
        if let drainTimeout { drain = drainTimeout }
    }
}

/// Loads a config file's shared part and turns its errors into usage errors (exit 2).
private func loadConfig<C>(_ path: String?, into config: inout C,
                           _ load: (String, inout C) throws(ConfigError) -> TunnelConfigFile.Common) throws -> TunnelConfigFile.Common? {
    guard let path else { return nil }
    do { return try load(path, &config) } catch { throw ValidationError("config \(error)") }
}

/// The logger from flags, else the config file, else the defaults.
private func makeLogger(_ logging: LoggingOptions, _ common: TunnelConfigFile.Common?) throws -> Logger {
    var level: Logger.Level?
    var format: LogFormat?
    if let text = common?.logLevel {
        guard let parsed = Logger.Level(rawValue: text) else { throw ValidationError("config: log_level '\(text)' is not a log level") }
        level = parsed
    }
    if let text = common?.logFormat {
        guard let parsed = LogFormat(rawValue: text) else { throw ValidationError("config: log_format '\(text)' is not text or json") }
        format = parsed
    }
    return logging.makeLogger(fallbackLevel: level, fallbackFormat: format)
}

/// The token from flags/environment, else from the config file.
private func resolveToken(_ options: TokenOptions, _ common: TunnelConfigFile.Common?, logger: Logger) throws -> String? {
    if let token = try options.resolve(logger: logger) { return token }
    if let file = common?.tokenFile { return try readToken(from: file, option: "token_file") }
    return common?.token
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
            or the config file.
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

    @Option(help: "Most connections still in their handshake (default: 128).")
    var maxUnauthenticated: Int?

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        if (cert == nil) != (key == nil) { throw ValidationError("--cert and --key go together") }
        if cert != nil && common.transport == .plain { throw ValidationError("--cert needs --transport tls") }
        for a in bindAddr where !SocketAddressCheck.isNumeric(a) {
            throw ValidationError("--bind-addr '\(a)' is not a numeric IP address")
        }
        for (name, value) in [("--max-clients", maxClients), ("--max-services", maxServices), ("--max-unauthenticated", maxUnauthenticated)] {
            if let v = value, v < 1 { throw ValidationError("\(name) must be at least 1, got \(v)") }
        }
    }

    func run() throws {
        var config = TunnelServerConfig()
        let file = try loadConfig(common.config, into: &config, TunnelConfigFile.loadServer)
        let logger = try makeLogger(logging, file)
        guard let tokenValue = try resolveToken(token, file, logger: logger) else {
            throw ValidationError("no token: give --token-file FILE or set CULVERT_TOKEN (make one with 'culvert token')")
        }
        if tokenValue.utf8.count < 16 {
            logger.warning("the token is short (\(tokenValue.utf8.count) bytes); use at least 16, e.g. from 'culvert token'")
        }
        config.token = tokenValue
        if !listen.isEmpty { config.listen = listen }
        common.apply(transport: &config.transport, heartbeat: &config.heartbeat,
                     handshake: &config.handshakeTimeout, drain: &config.drainTimeout)
        if let cert, let key {
            config.certFile = cert
            config.keyFile = key
        }
        if config.certFile != nil && config.transport == .plain {
            throw ValidationError("a certificate needs transport tls")
        }
        if let allowPorts { config.allowPorts = allowPorts }
        if !bindAddr.isEmpty { config.bindAddresses = bindAddr }
        if let maxClients { config.maxClients = maxClients }
        if let maxServices { config.maxServicesPerClient = maxServices }
        if let maxUnauthenticated { config.maxUnauthenticated = maxUnauthenticated }
        let status = ServiceRunner.run(threads: 1, drainTimeout: config.drainTimeout, logger: logger) { group, _ in
            try await TunnelServer.start(config: config, group: group, logger: logger)
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
            reachable. Reconnects with backoff forever; \
            exits 1 on authentication failure or when a service is refused at first start.
            """)

    @Argument(help: "Server address, HOST[:PORT] (default port 7000; may come from the config file).",
              transform: parseServerAddress)
    var server: HostPort?

    @Option(name: .customShort("R"), parsing: .singleValue,
            help: "Service to expose: [udp:][BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT; repeat for several.",
            transform: parseServiceSpec)
    var services: [ServiceSpec] = []

    @Option(name: .customLong("secret"), parsing: .singleValue,
            help: "Secret service with no public port: NAME=LOCAL_HOST:LOCAL_PORT; visitors reach it with --visit NAME. Repeat for several.",
            transform: parseSecretSpec)
    var secrets: [ServiceSpec] = []

    @Option(help: "File with the token of the secret services (--secret) or of the visited one (--visit); default: the client's token.")
    var serviceTokenFile: String?

    @Flag(help: "Deflate the data channels of the -R services (zlib, flushed per write).")
    var compress = false

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

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        if let pool, pool < 0 || pool > 64 { throw ValidationError("--pool must be between 0 and 64, got \(pool)") }
        if let mux, mux < 0 || mux > 16 { throw ValidationError("--mux must be between 0 and 16, got \(mux)") }
        if ca != nil && fingerprint != nil { throw ValidationError("give --ca or --fingerprint, not both") }
        if (ca != nil || fingerprint != nil) && common.transport == .plain {
            throw ValidationError("--ca and --fingerprint need --transport tls")
        }
        if visit != nil {
            if localListen == nil { throw ValidationError("--visit needs -L [BIND:]PORT to listen on") }
            if !services.isEmpty || !secrets.isEmpty { throw ValidationError("--visit cannot be combined with -R or --secret") }
        } else if localListen != nil {
            throw ValidationError("-L only works with --visit NAME")
        }
        if common.config == nil {
            if server == nil { throw ValidationError("missing <server>: give HOST[:PORT] of the culvert server") }
            if services.isEmpty && secrets.isEmpty && visit == nil {
                throw ValidationError("nothing to expose: give at least one -R [BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT or --secret NAME=HOST:PORT")
            }
        }
    }

    func run() throws {
        var config = TunnelClientConfig()
        let file = try loadConfig(common.config, into: &config, TunnelConfigFile.loadClient)
        let logger = try makeLogger(logging, file)
        guard let tokenValue = try resolveToken(token, file, logger: logger) else {
            throw ValidationError("no token: give --token-file FILE or set CULVERT_TOKEN")
        }
        config.token = tokenValue
        if let server {
            config.server = server
        } else if file?.hasServer != true {
            throw ValidationError("missing <server>: give HOST[:PORT] or server = \"HOST:PORT\" in the config file")
        }
        let serviceToken = try serviceTokenFile.map { try readToken(from: $0, option: "--service-token-file") }
        config.services += services.map { spec in
            var s = spec
            s.compress = compress
            return s
        }
        config.services += secrets.map { spec in
            var s = spec
            s.serviceToken = serviceToken
            return s
        }
        if config.services.isEmpty && visit == nil {
            throw ValidationError("nothing to expose: give -R, --secret or [services.NAME] in the config file")
        }
        common.apply(transport: &config.transport, heartbeat: &config.heartbeat,
                     handshake: &config.handshakeTimeout, drain: &config.drainTimeout)
        if let ca { config.caFile = ca; config.fingerprint = nil }
        if let fingerprint { config.fingerprint = fingerprint; config.caFile = nil }
        if let pool { config.pool = pool }
        if let mux { config.mux = mux }
        if let connectTimeout { config.connectTimeout = connectTimeout }
        if let reconnectMax { config.reconnectMax = reconnectMax }
        if config.transport == .plain && (config.caFile != nil || config.fingerprint != nil) {
            throw ValidationError("ca and fingerprint need transport tls")
        }
        let visit = self.visit
        let localListen = self.localListen
        let status = ServiceRunner.run(threads: 1, drainTimeout: config.drainTimeout, logger: logger) { group, control in
            if let visit, let localListen {
                return try await VisitorListener.start(config: config, name: visit, serviceToken: serviceToken,
                                                       listen: localListen, group: group, logger: logger)
            }
            return try await TunnelClient.start(config: config, group: group, logger: logger, control: control)
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

func parseServiceSpec(_ text: String) throws -> ServiceSpec {
    do { return try ServiceSpec.parse(text) } catch { throw ValidationError(error.description) }
}

func parsePortRanges(_ text: String) throws -> PortRanges {
    do { return try PortRanges.parse(text) } catch { throw ValidationError(error.description) }
}

func parseFingerprintArgument(_ text: String) throws -> [UInt8] {
    do { return try parseFingerprint(text) } catch { throw ValidationError(error.description) }
}
