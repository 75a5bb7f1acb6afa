import ArgumentParser
import Culvert
import Logging
import Reactor

/// `culvert pipe HOST:PORT`
struct PipeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pipe",
        abstract: "Connect stdin/stdout to a TCP port (for ssh -o ProxyCommand).",
        discussion: """
            EOF on stdin shuts down the connection's write side; the remote end closing \
            ends the command with exit status 0. Example: \
            ssh -o ProxyCommand='culvert pipe %h:%p' user@host
            """)

    @Argument(help: "Address to connect to, HOST:PORT or [IPv6]:PORT.", transform: parseHostPort)
    var target: HostPort

    @Option(help: "Time allowed to connect (default: 5s).", transform: parseDuration)
    var connectTimeout: Duration = .seconds(5)

    @Option(help: "Least severe level logged on stderr (default: warning).")
    var logLevel: Logger.Level = .warning

    func run() throws {
        StderrLogHandler.bootstrap(level: logLevel, format: .text)
        let logger = Logger(label: "culvert")
        let target = self.target
        let connectTimeout = self.connectTimeout
        let status = ServiceRunner.run(threads: 1, drainTimeout: .seconds(1), logger: logger) { group, control in
            try await StdioPipe.start(target: target, connectTimeout: connectTimeout, group: group, logger: logger, control: control)
        }
        if status != 0 { throw ExitCode(status) }
    }
}
