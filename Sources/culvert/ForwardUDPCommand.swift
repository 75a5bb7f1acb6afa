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
            and logged, then the process exits 0. -c FILE and SIGHUP work as for \
            'forward tcp' (the file says protocol = "udp"); a removed listener closes its \
            sessions at once.
            """
    )

    @Argument(help: "Address to listen on (may come from the config file).", transform: parseHostPort)
    var listen: HostPort?

    @Argument(help: "Target address(es) to relay to.", transform: parseHostPort)
    var targets: [HostPort] = []

    @Option(name: [.customShort("c"), .customLong("config")],
            help: ArgumentHelp("TOML config file; flags given on the command line override it. SIGHUP re-reads it.", valueName: "file"))
    var config: String?

    @Option(help: "How a new session picks a target: round-robin (default), random, first (failover in order).")
    var balance: BalanceStrategy?

    @Option(help: "Close a session with no datagram either way for this long (default: 60s).",
            transform: parseDuration)
    var idleTimeout: Duration?

    @Option(help: ArgumentHelp(
        "Drop datagrams from new clients beyond this many sessions (default: half the descriptors free at start, at most 10,000, so a flood meets this limit before EMFILE; 0: no limit, and a flood can take every descriptor).",
        valueName: "N"))
    var maxSessions: Int?

    @Option(help: "SO_RCVBUF/SO_SNDBUF per socket in bytes, suffixes K and M allowed (default: 4M).",
            transform: parseByteSize)
    var socketBuffer: Int?

    @Option(help: "Event loop threads (defaults to the number of cores).")
    var threads: Int?

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
        try usage { try flags.check(withFile: config != nil) }
    }

    func run() throws {
        let (flags, file) = (self.flags, config)
        var resolved = try usage { try UDPForwardConfig.resolve(flags: flags, file: file) }
        let (adminSettings, adminWarnings) = try admin.settings(command: "forward udp", file: resolved.admin)
        resolved.warnings += adminWarnings
        let configs = resolved.config
        let logger = resolved.makeLogger()
        let status = ServiceRunner.run(threads: configs[0].threads, drainTimeout: .seconds(1), logger: logger,
                                       admin: adminSettings) { group, _ in
            try await ForwardSet<UDPForwarder>.start(configs: configs, drainTimeout: .seconds(1), group: group, logger: logger,
                                                     configPath: file) { () throws(ConfigError) in
                try UDPForwardConfig.resolve(flags: flags, file: file).config
            }
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
