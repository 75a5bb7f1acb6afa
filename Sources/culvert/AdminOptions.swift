import ArgumentParser
import Culvert

/// `--admin` and `--admin-token-file`, shared by every long-running command.
struct AdminOptions: ParsableArguments {
    @Option(help: ArgumentHelp(
        "Serve /metrics (Prometheus), /status (JSON) and /healthz over HTTP on ADDR (PORT alone: loopback; port 0 works, see the 'listening admin' line).",
        valueName: "addr"), transform: parseHostPort)
    var admin: HostPort?

    @Option(help: ArgumentHelp("File with the token admin requests must send as 'Authorization: Bearer TOKEN'; needed for an address other hosts can reach.",
                               valueName: "file"))
    var adminTokenFile: String?

    var flags: AdminFlags { AdminFlags(address: admin, tokenFile: adminTokenFile) }

    /// The endpoint's settings: these options over the config file's `admin` keys
    /// (`file`), checked together (a file may hold what an option needs), the token read
    /// (exit 2 when it cannot be); nil without an address.
    func settings(command: String, file: AdminFlags) throws -> (AdminSettings?, warnings: [String]) {
        try usage { try AdminSettings.resolve(flags: flags.over(file), command: command) }
    }
}
