import ArgumentParser
import Culvert
import Logging
import Reactor

/// `culvert pipe HOST:PORT`
struct PipeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pipe",
        abstract: "Connect stdin/stdout to a TCP port or a secret service (for ssh -o ProxyCommand).",
        discussion: """
            EOF on stdin shuts down the connection's write side; the remote end closing \
            ends the command with exit status 0. Example: \
            ssh -o ProxyCommand='culvert pipe %h:%p' user@host
            """)

    @Argument(help: "Address to connect to, HOST:PORT or [IPv6]:PORT (not with --via).", transform: parseHostPort)
    var target: HostPort?

    @Option(help: "culvert server to go through, HOST[:PORT]; with --service.", transform: parseServerAddress)
    var via: HostPort?

    @Option(help: "Secret service to reach through --via.")
    var service: String?

    @Option(help: "File with the secret service's token (default: the token).")
    var serviceTokenFile: String?

    @OptionGroup var token: TokenOptions

    @Option(help: "Tunnel transport to --via: tls (default) or plain.")
    var transport: TunnelTransport = .tls

    @Option(help: "With --via: CA certificate (PEM) to verify a server that uses --cert.")
    var ca: String?

    @Option(help: "With --via: pinned SHA-256 fingerprint of the server certificate, sha256:HEX.", transform: parseFingerprintArgument)
    var fingerprint: [UInt8]?

    @Option(help: "Time allowed to connect (default: 5s).", transform: parseDuration)
    var connectTimeout: Duration = .seconds(5)

    @Option(help: "Least severe level logged on stderr (default: warning).")
    var logLevel: Logger.Level = .warning

    func validate() throws {
        switch (target, via, service) {
        case (.some, nil, nil): break
        case (nil, .some, .some): break
        case (.some, .some, _), (.some, _, .some): throw ValidationError("give HOST:PORT or --via SERVER --service NAME, not both")
        case (nil, .some, nil): throw ValidationError("--via needs --service NAME")
        case (nil, nil, .some): throw ValidationError("--service needs --via SERVER")
        case (nil, nil, nil): throw ValidationError("missing <target>: give HOST:PORT, or --via SERVER --service NAME")
        }
    }

    func run() throws {
        StderrLogHandler.bootstrap(level: logLevel, format: .text)
        let logger = Logger(label: "culvert")
        let connectTimeout = self.connectTimeout
        if let target {
            let status = ServiceRunner.run(threads: 1, drainTimeout: .seconds(1), logger: logger) { group, control in
                try await StdioPipe.start(target: target, connectTimeout: connectTimeout, group: group, logger: logger, control: control)
            }
            if status != 0 { throw ExitCode(status) }
            return
        }
        guard let via, let service else { return }
        guard let tokenValue = try token.resolve(logger: logger) else {
            throw ValidationError("no token: give --token-file FILE or set CULVERT_TOKEN")
        }
        var config = TunnelClientConfig()
        config.server = via
        config.token = tokenValue
        config.transport = transport
        config.caFile = ca
        config.fingerprint = fingerprint
        config.connectTimeout = connectTimeout
        let serviceToken = try serviceTokenFile.map { try readToken(from: $0, option: "--service-token-file") }
        let status = ServiceRunner.run(threads: 1, drainTimeout: .seconds(1), logger: logger) { group, control in
            try await StdioPipe.start(visiting: service, serviceToken: serviceToken, config: config,
                                      group: group, logger: logger, control: control)
        }
        if status != 0 { throw ExitCode(status) }
    }
}
