import ArgumentParser
import Culvert
import Reactor

/// `culvert forward tcp LISTEN TARGET...`
struct ForwardTCPCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tcp",
        abstract: "Forward TCP connections from LISTEN to one or more TARGETs.",
        discussion: """
            Addresses are HOST:PORT, [IPv6]:PORT, PORT (loopback only, like ssh -L) or \
            :PORT / *:PORT (all interfaces). LISTEN may use port 0: the ready line \
            'listening tcp ADDR -> TARGETS' on stdout shows the port actually bound. \
            With several targets, a target that refuses or times out is skipped and marked \
            down for a backoff (1 s, doubling up to 60 s). Plain TCP is relayed with \
            splice(2), without copying through user space. A TARGET written \
            ws://HOST[:PORT]/PATH or wss://HOST[:PORT]/PATH carries each connection to a \
            WebSocket endpoint as binary messages (wss verifies the server against the \
            system CA store, or --ca). With -c FILE the listeners come \
            from a TOML file (the flags' keys, plus [services.NAME] tables for more \
            listeners); SIGHUP re-reads it and starts, drains or replaces only the \
            listeners that changed.
            """
    )

    @Argument(help: "Address to listen on (may come from the config file).", transform: parseHostPort)
    var listen: HostPort?

    @Argument(help: "Target address(es) to relay to, or one ws:// or wss:// URL.")
    var targets: [String] = []

    @Option(name: [.customShort("c"), .customLong("config")],
            help: ArgumentHelp("TOML config file; flags given on the command line override it. SIGHUP re-reads it.", valueName: "file"))
    var config: String?

    @Option(help: "How a connection picks a target: round-robin (default), random, first (failover in order).")
    var balance: BalanceStrategy?

    @Option(help: "Time allowed to connect to one target before trying the next (e.g. 500ms; default: 5s).",
            transform: parseDuration)
    var connectTimeout: Duration?

    @Option(help: "Close a connection with no traffic either way for this long (default off).",
            transform: parseOptionalDuration)
    var idleTimeout: Duration?? = nil

    @Option(help: "Refuse new connections beyond this many open ones (default 0: no limit).")
    var maxConnections: Int?

    @OptionGroup var service: RelayServiceOptions

    @Option(help: ArgumentHelp("Write a PROXY protocol header (v1 text or v2 binary) naming the client to each target before the client's bytes.", valueName: "v1|v2"))
    var sendProxy: ProxyProtocolVersion?

    @Flag(help: "Every client must start with a PROXY protocol header (v1 or v2, e.g. from haproxy send-proxy); its source address is the client's from then on. Without a whole header within 5s the connection is closed.")
    var acceptProxy = false

    @Option(name: .customLong("header"), help: "Extra header of the WebSocket upgrade request, 'Name: value' (repeatable; ws:// and wss:// targets).")
    var headers: [String] = []

    @Option(help: "Host header of the WebSocket upgrade instead of the URL's (a CDN's edge name).")
    var hostHeader: String?

    @Option(help: "TLS server name (SNI and certificate check) instead of the URL's host (wss:// targets).")
    var sni: String?

    @Option(help: "Verify a wss:// server against the CA certificates in this PEM file instead of the system store.")
    var ca: String?

    @Option(help: "Ping a WebSocket target this often and drop it when a ping goes unanswered until the next (default: 20s; off).", transform: parseWebSocketPing)
    var wsPing: WebSocketPing?

    @Option(help: "Largest WebSocket message taken from the target, in bytes (default: 16777216); a longer one closes with 1009.")
    var wsMaxMessage: Int?

    @OptionGroup var logging: LoggingOptions
    @OptionGroup var admin: AdminOptions

    var flags: TCPForwardFlags {
        get throws {
            var flags = TCPForwardFlags(listen: listen, targets: [])
            if let url = targets.first(where: WebSocketURL.looksLikeURL) {
                var egress = WebSocketEgress(url: try WebSocketURL.parse(url))
                egress.headers = try headers.map { (h) throws(ConfigError) in try WebSocketEgress.parseHeader(h) }
                egress.hostHeader = hostHeader
                egress.serverName = sni
                egress.caFile = ca
                egress.setLimits(ping: wsPing?.interval, maxMessage: wsMaxMessage)
                flags.egress = egress
                flags.targets = targets.count == 1 ? [egress.url.target] : try targets.map(WebSocketURL.parseTarget)
            } else {
                let unused = [("--header", !headers.isEmpty), ("--host-header", hostHeader != nil), ("--sni", sni != nil),
                              ("--ca", ca != nil), ("--ws-ping", wsPing != nil), ("--ws-max-message", wsMaxMessage != nil)]
                if let (flag, _) = unused.first(where: \.1) {
                    throw ConfigError(setting: flag, "\(flag) applies to a ws:// or wss:// target only")
                }
                flags.targets = try targets.map(WebSocketURL.parseTarget)
            }
            return fill(flags)
        }
    }

    private func fill(_ base: TCPForwardFlags) -> TCPForwardFlags {
        var flags = base
        flags.balance = balance
        flags.connectTimeout = connectTimeout
        flags.idleTimeout = idleTimeout
        flags.maxConnections = maxConnections
        flags.drainTimeout = service.drainTimeout
        flags.threads = service.threads
        flags.noSplice = service.noSplice
        flags.sendProxy = sendProxy
        flags.acceptProxy = acceptProxy
        flags.log = logging.flags
        return flags
    }

    func validate() throws {
        try usage { try flags.check(withFile: config != nil) }
    }

    func run() throws {
        let (flags, file) = (try self.flags, config)
        var resolved = try usage { try TCPForwardConfig.resolve(flags: flags, file: file) }
        let (adminSettings, adminWarnings) = try admin.settings(command: "forward tcp", file: resolved.admin)
        resolved.warnings += adminWarnings
        let configs = resolved.config
        let logger = resolved.makeLogger()
        let first = configs[0]
        let status = ServiceRunner.run(threads: first.threads, drainTimeout: first.drainTimeout, logger: logger,
                                       admin: adminSettings) { group, _ in
            try await ForwardSet<TCPForwarder>.start(configs: configs, drainTimeout: first.drainTimeout, group: group, logger: logger,
                                                     configPath: file) { () throws(ConfigError) in
                try TCPForwardConfig.resolve(flags: flags, file: file).config
            }
        }
        if status != 0 { throw ExitCode(status) }
    }
}

extension WebSocketURL {
    /// A plain HOST:PORT target next to others; a URL here is one too many.
    static func parseTarget(_ text: String) throws -> HostPort {
        if looksLikeURL(text) {
            throw ConfigError(setting: "<targets>", "a WebSocket target (\(text)) must be the only target")
        }
        do { return try HostPort.parse(text) } catch { throw ConfigError(setting: "<targets>", error.description) }
    }
}

/// `--ws-ping` as given: an interval, or off (nil). A type of its own, because a
/// doubly optional option cannot tell "not given" from "off".
struct WebSocketPing {
    let interval: Duration?
}

func parseWebSocketPing(_ text: String) throws -> WebSocketPing {
    WebSocketPing(interval: try parseOptionalDuration(text))
}

func parseHostPort(_ text: String) throws -> HostPort {
    do { return try HostPort.parse(text) } catch { throw ValidationError(error.description) }
}

func parseDuration(_ text: String) throws -> Duration {
    do { return try DurationSpec.parse(text) } catch { throw ValidationError(error.description) }
}

func parseOptionalDuration(_ text: String) throws -> Duration? {
    do { return try DurationSpec.parseOptional(text) } catch { throw ValidationError(error.description) }
}

extension ProxyProtocolVersion: ExpressibleByArgument {}
