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
            splice(2), without copying through user space.
            """
    )

    @Argument(help: "Address to listen on.", transform: parseHostPort)
    var listen: HostPort

    @Argument(help: "Target address(es) to relay to.", transform: parseHostPort)
    var targets: [HostPort] = []

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

    @Flag(help: "Copy through user-space buffers instead of splice(2).")
    var noSplice = false

    @OptionGroup var logging: LoggingOptions
    @OptionGroup var admin: AdminOptions

    var flags: TCPForwardFlags {
        var flags = TCPForwardFlags(listen: listen, targets: targets)
        flags.balance = balance
        flags.connectTimeout = connectTimeout
        flags.idleTimeout = idleTimeout ?? nil
        flags.maxConnections = maxConnections
        flags.drainTimeout = drainTimeout
        flags.threads = threads
        flags.noSplice = noSplice
        flags.log = logging.flags
        return flags
    }

    func validate() throws {
        try usage { try flags.check() }
    }

    func run() throws {
        var resolved = try usage { try TCPForwardConfig.resolve(flags: flags) }
        let (adminSettings, adminWarnings) = try admin.settings(command: "forward tcp")
        resolved.warnings += adminWarnings
        let config = resolved.config
        let logger = resolved.makeLogger()
        let status = ServiceRunner.run(threads: config.threads, drainTimeout: config.drainTimeout, logger: logger,
                                       admin: adminSettings) { group, _ in
            try await TCPForwarder.start(config: config, group: group, logger: logger)
        }
        if status != 0 { throw ExitCode(status) }
    }
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
