import ArgumentParser
import Culvert
import Reactor

/// `culvert forward ws LISTEN TARGET...`: a WebSocket-to-TCP bridge (websockify-like).
struct ForwardWSCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ws",
        abstract: "Accept WebSocket connections at LISTEN and relay their binary messages to TCP TARGETs.",
        discussion: """
            Each WebSocket upgrade at --ws-path becomes one TCP connection to a TARGET \
            (balanced and failed over as in 'forward tcp'); binary message payloads are \
            relayed as a byte stream both ways, and the close handshake maps to TCP \
            half-close. Other paths get 404, requests without a valid upgrade 400 or 426, \
            with one log line each (summarised once a second under a flood). With --cert \
            and --key the listener speaks TLS (wss). The ready line is \
            'listening ws ADDR -> TARGETS' ('listening wss …' with TLS).
            """
    )

    @Argument(help: "Address to listen on.", transform: parseHostPort)
    var listen: HostPort

    @Argument(help: "Target address(es) to relay to.", transform: parseHostPort)
    var targets: [HostPort] = []

    @Option(help: "The only path that upgrades (default: /); any other gets 404, so it can serve as a shared secret.")
    var wsPath: String = "/"

    @Option(help: "Certificate chain (PEM) for wss; needs --key.")
    var cert: String?

    @Option(help: "Private key (PEM) for wss; needs --cert.")
    var key: String?

    @Option(help: "Ping each client this often and drop it when a ping goes unanswered until the next (default: 20s; off).", transform: parseWebSocketPing)
    var wsPing: WebSocketPing?

    @Option(help: "Largest message taken from a client, in bytes (default: 16777216); a longer one closes with 1009.")
    var wsMaxMessage: Int?

    @Option(help: "How a connection picks a target: round-robin, random, first (failover in order).")
    var balance: BalanceStrategy = .roundRobin

    @Option(help: "Time allowed to connect to one target before trying the next (e.g. 500ms; default: 5s).",
            transform: parseDuration)
    var connectTimeout: Duration = .seconds(5)

    @Option(help: "Close a connection with no traffic either way for this long (default off).",
            transform: parseOptionalDuration)
    var idleTimeout: Duration?? = nil

    @Option(help: "Refuse new connections beyond this many open ones (0: no limit).")
    var maxConnections: Int = 0

    @Option(help: "On SIGINT/SIGTERM, time in-flight connections get to finish before they are reset (default: 30s).",
            transform: parseDuration)
    var drainTimeout: Duration = .seconds(30)

    @Option(help: "Event loop threads (defaults to the number of cores).")
    var threads: Int = LoopGroup.coreCount

    @OptionGroup var logging: LoggingOptions

    var flags: TCPForwardFlags {
        var flags = TCPForwardFlags(listen: listen, targets: targets)
        var ingress = WebSocketIngress()
        ingress.path = wsPath
        ingress.certFile = cert
        ingress.keyFile = key
        ingress.setLimits(ping: wsPing?.interval, maxMessage: wsMaxMessage)
        flags.ingress = ingress
        flags.balance = balance
        flags.connectTimeout = connectTimeout
        flags.idleTimeout = idleTimeout ?? nil
        flags.maxConnections = maxConnections
        flags.drainTimeout = drainTimeout
        flags.threads = threads
        flags.log = logging.flags
        return flags
    }

    func validate() throws {
        try usage { try flags.check() }
    }

    func run() throws {
        let resolved = try usage { try TCPForwardConfig.resolve(flags: flags) }
        let config = resolved.config
        let logger = resolved.makeLogger()
        let status = ServiceRunner.run(threads: config.threads, drainTimeout: config.drainTimeout, logger: logger) { group, _ in
            try await TCPForwarder.start(config: config, group: group, logger: logger)
        }
        if status != 0 { throw ExitCode(status) }
    }
}
