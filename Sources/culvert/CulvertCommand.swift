#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Culvert
import Logging

/// `culvert`: the root command.
struct CulvertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "culvert",
        abstract: "Fast, safe TCP/UDP forwarding and tunneling.",
        discussion: """
            Every listening command prints a ready line on stdout once it is listening \
            and logs to stderr. Exit status: 0 on success and after SIGINT/SIGTERM, 1 on a runtime \
            failure, 2 on a usage error. See culvert(1).
            """,
        version: ProcessMetrics.version,
        subcommands: [ForwardCommand.self, ProxyCommand.self, ServerCommand.self, ClientCommand.self, PipeCommand.self, TokenCommand.self, CheckCommand.self]
    )

    func run() throws { throw CommandLineUsage.MissingSubcommand(group: Self.self) }
}

/// `culvert forward`: layer-4 forwarders.
struct ForwardCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forward",
        abstract: "Listen here and relay to one or more targets.",
        subcommands: [ForwardTCPCommand.self, ForwardUDPCommand.self, ForwardWSCommand.self]
    )

    func run() throws { throw CommandLineUsage.MissingSubcommand(group: Self.self) }
}

/// Logging flags every long-running command shares. Optional, so a config file's
/// log_level/log_format apply unless a flag is given.
struct LoggingOptions: ParsableArguments {
    @Option(help: "Least severe level logged: trace, debug, info, notice, warning, error, critical (default: info).")
    var logLevel: Logger.Level?

    @Option(help: "Log line format on stderr: text or json (default: text).")
    var logFormat: LogFormat?

    var flags: LogFlags { LogFlags(level: logLevel, format: logFormat) }
}

/// Runs a check or a resolution of the Culvert module, turning its error into a usage
/// error (exit status 2) that shows the error's text unchanged.
func usage<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch let error as ConfigError { throw ValidationError(error.description) }
}

extension Resolved {
    /// Installs the log handler these settings describe, then logs what resolving found.
    func makeLogger() -> Logger {
        StderrLogHandler.bootstrap(level: log.level, format: log.format)
        let logger = Logger(label: "culvert")
        for warning in warnings { logger.warning("\(warning)") }
        return logger
    }

    /// These settings after keeping the process, which now holds their token, out of core
    /// dumps; a failure to do so becomes a warning, as the token itself still works.
    func holdingToken() -> Resolved {
        var resolved = self
        do { try TokenHolder.keepOutOfCoreDumps() } catch {
            resolved.warnings.append("cannot keep the token out of core dumps: \(error)")
        }
        return resolved
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {
    public static var allValueStrings: [String] { allCases.map(\.rawValue) }
}

extension LogFormat: ExpressibleByArgument {}

extension BalanceStrategy: ExpressibleByArgument {}

/// stderr output for the entry point, which has no logger yet.
enum FileHandleStderr {
    static func write(_ message: String) {
        fputs(message.hasSuffix("\n") ? message : message + "\n", stderr)
    }
}
