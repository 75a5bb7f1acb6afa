import ArgumentParser
import Culvert

/// `culvert proxy [options] [-c FILE] [LISTEN]`
struct ProxyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "proxy",
        abstract: "Run a SOCKS5 and HTTP proxy on one port.",
        discussion: """
            LISTEN is HOST:PORT, [IPv6]:PORT, PORT (loopback only) or :PORT / *:PORT (all \
            interfaces); the ready line 'listening proxy ADDR' on stdout shows the port \
            bound. Each connection speaks SOCKS5 (RFC 1928: CONNECT with IPv4, IPv6 or a \
            name culvert resolves; UDP ASSOCIATE with a relay socket on the address the \
            client connected to; BIND is answered 'command not supported') or HTTP (CONNECT host:port, and absolute-form http:// requests \
            forwarded with keep-alive), chosen by its first byte. Without --auth-file, \
            culvert refuses to listen on a non-loopback address unless --no-auth is given. \
            DEST for --allow/--deny is a CIDR or address, a host name or *.domain, or *, \
            with an optional :PORT or :LOW-HIGH; deny wins, and with any --allow only what \
            is allowed is reached. Names are checked as asked and again after resolution. \
            With -c FILE, the settings may come from a TOML file whose keys are the \
            options' names with '_' (listen, auth_file, allow, deny, connect_timeout, ...); \
            options given on the command line override it.
            """
    )

    @Argument(help: "Address to listen on (may come from the config file).", transform: parseHostPort)
    var listen: HostPort?

    @Option(name: [.customShort("c"), .customLong("config")],
            help: ArgumentHelp("TOML config file with the options as keys; options given here override it.", valueName: "file"))
    var config: String?

    @Option(help: "File of 'user:password' lines: clients must authenticate (SOCKS5 username/password, HTTP Proxy-Authorization: Basic).")
    var authFile: String?

    @Flag(help: "Allow an unauthenticated proxy on a non-loopback address.")
    var noAuth = false

    @Option(help: ArgumentHelp("Destination clients may reach (repeatable).", valueName: "DEST"))
    var allow: [String] = []

    @Option(help: ArgumentHelp("Destination clients may not reach (repeatable; wins over --allow).", valueName: "DEST"))
    var deny: [String] = []

    @Option(help: "Time allowed to connect to a destination (default: 10s).", transform: parseDuration)
    var connectTimeout: Duration?

    @Option(help: "Time a client gets to finish its greeting and request (default: 10s).", transform: parseDuration)
    var handshakeTimeout: Duration?

    @Option(help: "Close a relayed connection with no traffic either way for this long (default off).",
            transform: parseOptionalDuration)
    var idleTimeout: Duration?? = nil

    @Option(help: "Refuse clients beyond this many open connections (default: a quarter of the free descriptors).")
    var maxConnections: Int?

    @Option(help: "End a UDP association (and its TCP connection) with no datagram either way for this long (default: 2m).",
            transform: parseDuration)
    var udpIdleTimeout: Duration?

    @Option(help: "Refuse UDP ASSOCIATE beyond this many open associations (default: from the free descriptors).")
    var maxUdpAssociations: Int?

    @OptionGroup var service: RelayServiceOptions

    @OptionGroup var logging: LoggingOptions

    @OptionGroup var admin: AdminOptions

    var flags: ProxyFlags {
        var flags = ProxyFlags(listen: listen)
        flags.authFile = authFile
        flags.noAuth = noAuth
        flags.allow = allow
        flags.deny = deny
        flags.connectTimeout = connectTimeout
        flags.handshakeTimeout = handshakeTimeout
        flags.idleTimeout = idleTimeout
        flags.maxConnections = maxConnections
        flags.udpIdleTimeout = udpIdleTimeout
        flags.maxAssociations = maxUdpAssociations
        flags.drainTimeout = service.drainTimeout
        flags.threads = service.threads
        flags.noSplice = service.noSplice
        flags.log = logging.flags
        return flags
    }

    func validate() throws {
        try usage { try flags.check(withFile: config != nil) }
    }

    func run() throws {
        let (flags, file) = (self.flags, self.config)
        var resolved = try usage { try ProxyConfig.resolve(flags: flags, file: file) }
        let (adminSettings, adminWarnings) = try admin.settings(command: "proxy", file: resolved.admin)
        resolved.warnings += adminWarnings
        let config = resolved.config
        let logger = resolved.makeLogger()
        let status = ServiceRunner.run(threads: config.threads, drainTimeout: config.drainTimeout, logger: logger,
                                       admin: adminSettings) { group, _ in
            try await ProxyServer.start(config: config, group: group, logger: logger)
        }
        if status != 0 { throw ExitCode(status) }
    }
}
