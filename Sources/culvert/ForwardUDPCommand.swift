import ArgumentParser
import Culvert
import Reactor

/// `culvert forward udp LISTEN TARGET...`
struct ForwardUDPCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "udp",
        abstract: "Forward UDP datagrams from LISTEN to one or more TARGETs.",
        discussion: """
            Datagrams from each client address form a session with its own socket \
            connected to one target, so replies reach the right client and an ICMP error \
            from the target ends only that session. Datagram boundaries are kept; sizes \
            up to 65,507 bytes (IPv4) pass. Addresses as for 'forward tcp'. The ready line \
            is 'listening udp ADDR -> TARGETS'. On SIGINT/SIGTERM every session is closed \
            and logged, then the process exits 0.
            """
    )

    @Argument(help: "Address to listen on.", transform: parseHostPort)
    var listen: HostPort

    @Argument(help: "Target address(es) to relay to.", transform: parseHostPort)
    var targets: [HostPort] = []

    @Option(help: "How a new session picks a target: round-robin, random, first (failover in order).")
    var balance: BalanceStrategy = .roundRobin

    @Option(help: "Close a session with no datagram either way for this long (default: 60s).",
            transform: parseDuration)
    var idleTimeout: Duration = .seconds(60)

    @Option(help: ArgumentHelp(
        "Drop datagrams from new clients beyond this many sessions (default: half the descriptors free at start, at most 10,000, so a flood meets this limit before EMFILE; 0: no limit, and a flood can take every descriptor).",
        valueName: "N"))
    var maxSessions: Int?

    @Option(help: "SO_RCVBUF/SO_SNDBUF per socket in bytes, suffixes K and M allowed (default: 4M).",
            transform: parseByteSize)
    var socketBuffer: Int = 4 << 20

    @Option(help: "Event loop threads (defaults to the number of cores).")
    var threads: Int = LoopGroup.coreCount

    @OptionGroup var logging: LoggingOptions
    @OptionGroup var admin: AdminOptions

    var flags: UDPForwardFlags {
        var flags = UDPForwardFlags(listen: listen, targets: targets)
        flags.balance = balance
        flags.idleTimeout = idleTimeout
        flags.maxSessions = maxSessions
        flags.socketBuffer = socketBuffer
        flags.threads = threads
        flags.log = logging.flags
        return flags
    }

    func validate() throws {
        try usage { try flags.check() }
    }

    func run() throws {
        var resolved = try usage { try UDPForwardConfig.resolve(flags: flags) }
        let (adminSettings, adminWarnings) = try admin.settings(command: "forward udp")
        resolved.warnings += adminWarnings
        let config = resolved.config
        let logger = resolved.makeLogger()
        let status = ServiceRunner.run(threads: config.threads, drainTimeout: .seconds(1), logger: logger,
                                       admin: adminSettings) { group, _ in
            try await UDPForwarder.start(config: config, group: group, logger: logger)
        }
        if status != 0 { throw ExitCode(status) }
    }
}

func parseByteSize(_ text: String) throws -> Int {
    let s = text.uppercased()
    let (digits, scale): (Substring, Int) =
        s.hasSuffix("K") ? (s.dropLast(), 1 << 10) : s.hasSuffix("M") ? (s.dropLast(), 1 << 20) : (Substring(s), 1)
    guard let n = Int(digits), n >= 0, n <= (1 << 30) / scale else {
        throw ValidationError("invalid size '\(text)': use bytes, or a number with K or M (at most 1024M)")
    }
    return n * scale
}
