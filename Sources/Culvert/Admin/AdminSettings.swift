/// `--admin ADDR` and `--admin-token-file FILE` as given on the command line.
public struct AdminFlags: Sendable {
    public var address: HostPort?
    public var tokenFile: String?

    public init(address: HostPort? = nil, tokenFile: String? = nil) {
        self.address = address
        self.tokenFile = tokenFile
    }

    /// These flags (the command line's) laid over `file`'s: each one given wins.
    public func over(_ file: AdminFlags) -> AdminFlags {
        AdminFlags(address: address ?? file.address, tokenFile: tokenFile ?? file.tokenFile)
    }

    /// The rules that need no file: a token file needs `--admin`; an address other
    /// people can reach needs a token file.
    public func check() throws(ConfigError) {
        guard let address else {
            if tokenFile != nil {
                throw ConfigError(setting: "--admin-token-file", "--admin-token-file needs --admin ADDR")
            }
            return
        }
        if tokenFile == nil && !AdminSettings.isLoopback(address) {
            throw ConfigError(setting: "--admin",
                "--admin \(address) is reachable from other hosts: add --admin-token-file FILE so that requests must carry the token, or listen on loopback (--admin 127.0.0.1:\(address.port))")
        }
    }
}

/// The admin endpoint a command runs: where it listens and the bearer token requests
/// must carry (nil: none, allowed on loopback only).
public struct AdminSettings: Sendable {
    public let address: HostPort
    let token: String?
    /// The command's name as `culvert_build_info` and `/status` give it (`forward tcp`).
    public let command: String

    /// The settings `flags` describe, the token read and checked; nil without `--admin`.
    public static func resolve(flags: AdminFlags, command: String) throws(ConfigError) -> (AdminSettings?, warnings: [String]) {
        try flags.check()
        guard let address = flags.address else { return (nil, []) }
        var warnings: [String] = []
        let token = try flags.tokenFile.map { (path) throws(ConfigError) in
            try TokenRules.read(TokenOrigin("--admin-token-file", path: path), warnings: &warnings)
        }
        return (AdminSettings(address: address, token: token, command: command), warnings)
    }

    /// Loopback addresses: 127.0.0.0/8, ::1 and the name localhost. A wildcard (no
    /// host) and every other name count as reachable from elsewhere.
    static func isLoopback(_ address: HostPort) -> Bool {
        guard let host = address.host?.lowercased() else { return false }
        if host == "localhost" || host == "::1" || host == "0:0:0:0:0:0:0:1" { return true }
        let parts = host.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts[0] == "127" && parts.allSatisfy { UInt8($0) != nil }
    }
}
