#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Culvert

extension ConfigCheck.Kind: ExpressibleByArgument {}

/// `culvert check -c FILE [--kind server|client|forward]`
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Validate a config file and print what it would run.",
        discussion: """
            Reads FILE as the command it is for (from its keys, or --kind) would at \
            start-up, with the token from the file or CULVERT_TOKEN, and prints a summary \
            on stdout. Exit status 0 when the file is good, 2 with the start-up message \
            (file, key, what is wrong) when it is not. Nothing is bound or connected.
            """)

    @Option(name: [.customShort("c"), .customLong("config")], help: ArgumentHelp("TOML config file to check.", valueName: "file"))
    var config: String

    @Option(help: "The command the file is for: server, client or forward (default: told by its keys).")
    var kind: ConfigCheck.Kind?

    func run() throws {
        let path = config
        let lines: [String] = try usage {
            let token = TokenFlags(environment: getenv("CULVERT_TOKEN").map { String(cString: $0) })
            switch try kind ?? ConfigCheck.detect(path) {
            case .server:
                var flags = TunnelServerFlags()
                flags.token = token
                return ConfigCheck.summary(try TunnelServerConfig.resolve(flags: flags, file: path).config)
            case .client:
                var flags = TunnelClientFlags()
                flags.token = token
                return ConfigCheck.summary(try TunnelClientConfig.resolve(flags: flags, file: path).config)
            case .forward:
                if try ConfigCheck.forwardProtocol(path) == "udp" {
                    return ConfigCheck.summary(try UDPForwardConfig.resolve(flags: UDPForwardFlags(listen: nil, targets: []), file: path).config)
                }
                return ConfigCheck.summary(try TCPForwardConfig.resolve(flags: TCPForwardFlags(listen: nil, targets: []), file: path).config)
            }
        }
        print("config \(path): ok")
        for line in lines { print(line) }
    }
}
