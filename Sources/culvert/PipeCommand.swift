import ArgumentParser
import Culvert
import Logging

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

    var flags: PipeFlags {
        var flags = PipeFlags()
        flags.target = target
        flags.via = via
        flags.service = service
        flags.serviceTokenFile = serviceTokenFile
        flags.token = token.flags
        flags.transport = transport
        flags.ca = ca
        flags.fingerprint = fingerprint
        flags.connectTimeout = connectTimeout
        flags.log = LogFlags(level: logLevel, format: .text)
        return flags
    }

    func validate() throws {
        try usage { try flags.check() }
    }

    func run() throws {
        var resolved = try usage { try PipeConfig.resolve(flags: flags) }
        if case .secretService = resolved.config { resolved = resolved.holdingToken() }
        let logger = resolved.makeLogger()
        let status = ServiceRunner.run(threads: 1, drainTimeout: .seconds(1), logger: logger, hangupStops: true) { group, control in
            switch resolved.config {
            case .address(let target, let connectTimeout):
                return try await StdioPipe.start(target: target, connectTimeout: connectTimeout, group: group,
                                                 logger: logger, control: control)
            case .secretService(let name, let serviceToken, let tunnel):
                return try await StdioPipe.start(visiting: name, serviceToken: serviceToken, config: tunnel,
                                                 group: group, logger: logger, control: control)
            }
        }
        if status != 0 { throw ExitCode(status) }
    }
}
