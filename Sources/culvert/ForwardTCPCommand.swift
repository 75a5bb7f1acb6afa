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
            splice(2), without copying through user space. With -c FILE the listeners come \
            from a TOML file (the flags' keys, plus [services.NAME] tables for more \
            listeners); SIGHUP re-reads it and starts, drains or replaces only the \
            listeners that changed.
            """
    )

    @Argument(help: "Address to listen on (may come from the config file).", transform: parseHostPort)
    var listen: HostPort?

    @Argument(help: "Target address(es) to relay to.", transform: parseHostPort)
    var targets: [HostPort] = []

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

    @Option(help: "On SIGINT/SIGTERM, time in-flight connections get to finish before they are reset (default: 30s).",
            transform: parseDuration)
    var drainTimeout: Duration?

    @Option(help: "Event loop threads (defaults to the number of cores).")
    var threads: Int?

    @Flag(help: "Copy through user-space buffers instead of splice(2).")
    var noSplice = false

    @OptionGroup var logging: LoggingOptions

    var flags: TCPForwardFlags {
        var flags = TCPForwardFlags(listen: listen, targets: targets)
        flags.balance = balance
        flags.connectTimeout = connectTimeout
        flags.idleTimeout = idleTimeout
        flags.maxConnections = maxConnections
        flags.drainTimeout = drainTimeout
        flags.threads = threads
        flags.noSplice = noSplice
        flags.log = logging.flags
        return flags
    }

    func validate() throws {
        try usage { try flags.check(withFile: config != nil) }
    }

    func run() throws {
        let (flags, file) = (self.flags, config)
        let resolved = try usage { try TCPForwardConfig.resolve(flags: flags, file: file) }
        let configs = resolved.config
        let logger = resolved.makeLogger()
        let first = configs[0]
        let status = ServiceRunner.run(threads: first.threads, drainTimeout: first.drainTimeout, logger: logger) { group, _ in
            try await ForwardSet<TCPForwarder>.start(configs: configs, drainTimeout: first.drainTimeout, group: group, logger: logger,
                                                     configPath: file) { () throws(ConfigError) in
                try TCPForwardConfig.resolve(flags: flags, file: file).config
            }
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
