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
        if let tokenFile {
            guard let text = readWholeFile(tokenFile) else {
                throw ValidationError("--token-file: cannot read '\(tokenFile)'")
            }
            let firstLine = text.split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
            let token = firstLine.trimmingCharacters()
            guard !token.isEmpty else { throw ValidationError("--token-file: '\(tokenFile)' is empty") }
            return token
        }
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

func readWholeFile(_ path: String) -> String? {
    guard let f = fopen(path, "r") else { return nil }
    defer { fclose(f) }
    var bytes: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n > 0 { bytes += buf[0..<n] }
        if n < buf.count { break }
    }
    return String(validating: bytes, as: UTF8.self)
}

extension String {
    func trimmingCharacters() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
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

/// Shared flags of server and client.
struct TunnelCommonOptions: ParsableArguments {
    @Option(help: "tls (default; TLS 1.3, a PSK from the token unless certificates are set) or plain (both ends must ask; not encrypted).")
    var transport: TunnelTransport = .tls

    @Option(help: "Heartbeat interval (default: 5s).", transform: parseDuration)
    var heartbeatInterval: Duration = .seconds(5)

    @Option(help: "Missed heartbeats after which the peer counts as dead (default: 3).")
    var heartbeatMisses: Int = 3

    @Option(help: "Time a new connection gets to finish its handshake (default: 10s).", transform: parseDuration)
    var handshakeTimeout: Duration = .seconds(10)

    @Option(help: "On SIGINT/SIGTERM, time tunneled connections get to finish (default: 30s).", transform: parseDuration)
    var drainTimeout: Duration = .seconds(30)

    func validate() throws {
        if heartbeatMisses < 1 { throw ValidationError("--heartbeat-misses must be at least 1") }
        if heartbeatInterval == .zero { throw ValidationError("--heartbeat-interval must be more than 0") }
        if handshakeTimeout == .zero { throw ValidationError("--handshake-timeout must be more than 0") }
    }

    var heartbeat: Heartbeat {
        var hb = Heartbeat()
        hb.interval = heartbeatInterval
        hb.misses = heartbeatMisses
        return hb
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
            listening address. The token comes from --token-file, CULVERT_TOKEN or --token.
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
    var allowPorts: PortRanges = .unprivileged

    @Option(name: .customLong("bind-addr"), parsing: .singleValue,
            help: "Address services may bind; repeat for several (default: any; services without BIND get the first, or 0.0.0.0).")
    var bindAddr: [String] = []

    @Option(help: "Most clients connected at once (default: 64).")
    var maxClients: Int = 64

    @Option(help: "Most services per client (default: 32).")
    var maxServices: Int = 32

    @Option(help: "Most connections still in their handshake (default: 128).")
    var maxUnauthenticated: Int = 128

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        if (cert == nil) != (key == nil) { throw ValidationError("--cert and --key go together") }
        if cert != nil && common.transport == .plain { throw ValidationError("--cert needs --transport tls") }
        for a in bindAddr where SocketAddressCheck.isNumeric(a) == false {
            throw ValidationError("--bind-addr '\(a)' is not a numeric IP address")
        }
        if maxClients < 1 || maxServices < 1 || maxUnauthenticated < 1 {
            throw ValidationError("--max-clients, --max-services and --max-unauthenticated must be at least 1")
        }
    }

    func run() throws {
        let logger = logging.makeLogger()
        guard let tokenValue = try token.resolve(logger: logger) else {
            throw ValidationError("no token: give --token-file FILE or set CULVERT_TOKEN (make one with 'culvert token')")
        }
        if tokenValue.utf8.count < 16 {
            logger.warning("the token is short (\(tokenValue.utf8.count) bytes); use at least 16, e.g. from 'culvert token'")
        }
        var config = TunnelServerConfig()
        if !listen.isEmpty { config.listen = listen }
        config.token = tokenValue
        config.transport = common.transport
        config.certFile = cert
        config.keyFile = key
        config.allowPorts = allowPorts
        config.bindAddresses = bindAddr
        config.maxClients = maxClients
        config.maxServicesPerClient = maxServices
        config.maxUnauthenticated = maxUnauthenticated
        config.handshakeTimeout = common.handshakeTimeout
        config.heartbeat = common.heartbeat
        config.drainTimeout = common.drainTimeout
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
            -R [BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT exposes LOCAL_HOST:LOCAL_PORT on \
            the server's REMOTE_PORT (0: the server picks). Prints 'exposed tcp ADDR -> \
            LOCAL' once per service when it is reachable. Reconnects with backoff forever; \
            exits 1 on authentication failure or when a service is refused at first start.
            """)

    @Argument(help: "Server address, HOST[:PORT] (default port 7000).", transform: parseServerAddress)
    var server: HostPort

    @Option(name: .customShort("R"), parsing: .singleValue,
            help: "Service to expose: [BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT; repeat for several.",
            transform: parseServiceSpec)
    var services: [ServiceSpec] = []

    @OptionGroup var token: TokenOptions
    @OptionGroup var common: TunnelCommonOptions

    @Option(help: "CA certificate (PEM) to verify a server that uses --cert; the server name is checked.")
    var ca: String?

    @Option(help: "Pinned SHA-256 fingerprint of the server certificate: sha256:HEX.", transform: parseFingerprint)
    var fingerprint: [UInt8]?

    @Option(help: "Pre-opened data channels kept ready (default: 2).")
    var pool: Int = 2

    @Option(help: "Time allowed to connect to the server or a local service (default: 5s).", transform: parseDuration)
    var connectTimeout: Duration = .seconds(5)

    @Option(help: "Longest wait between reconnect attempts (default: 30s).", transform: parseDuration)
    var reconnectMax: Duration = .seconds(30)

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        if services.isEmpty { throw ValidationError("nothing to expose: give at least one -R [BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT") }
        if pool < 0 || pool > 64 { throw ValidationError("--pool must be between 0 and 64, got \(pool)") }
        if ca != nil && fingerprint != nil { throw ValidationError("give --ca or --fingerprint, not both") }
        if (ca != nil || fingerprint != nil) && common.transport == .plain {
            throw ValidationError("--ca and --fingerprint need --transport tls")
        }
    }

    func run() throws {
        let logger = logging.makeLogger()
        guard let tokenValue = try token.resolve(logger: logger) else {
            throw ValidationError("no token: give --token-file FILE or set CULVERT_TOKEN")
        }
        var config = TunnelClientConfig()
        config.server = server
        config.token = tokenValue
        config.transport = common.transport
        config.caFile = ca
        config.fingerprint = fingerprint
        config.services = services
        config.pool = pool
        config.heartbeat = common.heartbeat
        config.handshakeTimeout = common.handshakeTimeout
        config.connectTimeout = connectTimeout
        config.reconnectMax = reconnectMax
        config.drainTimeout = common.drainTimeout
        let status = ServiceRunner.run(threads: 1, drainTimeout: config.drainTimeout, logger: logger) { group, control in
            try await TunnelClient.start(config: config, group: group, logger: logger, control: control)
        }
        if status != 0 { throw ExitCode(status) }
    }
}

func parseServerAddress(_ text: String) throws -> HostPort {
    if let parsed = try? HostPort.parse(text), parsed.host != "127.0.0.1" || text.contains(":") { return parsed }
    // A bare host name or address: the default port.
    let host = text.hasPrefix("[") && text.hasSuffix("]") ? String(text.dropFirst().dropLast()) : text
    guard !host.isEmpty, !host.contains(" ") else { throw ValidationError("invalid server address '\(text)'") }
    if host.contains(":") && SocketAddressCheck.isNumeric(host) == false {
        throw ValidationError("invalid server address '\(text)': write IPv6 addresses in brackets, e.g. [::1]:7000")
    }
    return HostPort(host: host, port: 7000)
}

func parseServiceSpec(_ text: String) throws -> ServiceSpec {
    do { return try ServiceSpec.parse(text) } catch { throw ValidationError(error.description) }
}

func parsePortRanges(_ text: String) throws -> PortRanges {
    do { return try PortRanges.parse(text) } catch { throw ValidationError(error.description) }
}

func parseFingerprint(_ text: String) throws -> [UInt8] {
    let lower = text.lowercased()
    guard lower.hasPrefix("sha256:") else { throw ValidationError("fingerprint '\(text)' must start with sha256:") }
    let hex = lower.dropFirst(7).filter { $0 != ":" }
    guard hex.count == 64 else { throw ValidationError("fingerprint '\(text)' must have 64 hex digits after sha256:") }
    var out: [UInt8] = []
    var i = hex.startIndex
    while i < hex.endIndex {
        let j = hex.index(i, offsetBy: 2)
        guard let byte = UInt8(hex[i..<j], radix: 16) else { throw ValidationError("fingerprint '\(text)' is not hex") }
        out.append(byte)
        i = j
    }
    return out
}
