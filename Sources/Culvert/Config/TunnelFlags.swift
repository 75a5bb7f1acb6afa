import Logging

/// Where a tunnel command's shared token may come from, as the command line and the
/// environment give it; nil when not given. Resolution tries them in the order of the
/// fields, then the config file.
public struct TokenFlags: Sendable {
    /// `--token-file`.
    public var tokenFile: String?
    /// `CULVERT_TOKEN`, when set (an empty value is refused, not skipped).
    public var environment: String?
    /// `--token`, which every user can read in the process list.
    public var token: String?

    public init(tokenFile: String? = nil, environment: String? = nil, token: String? = nil) {
        self.tokenFile = tokenFile
        self.environment = environment
        self.token = token
    }
}

/// The flags `culvert server` and `culvert client` share, nil when not given so that the
/// config file, and then the model's defaults, apply.
public struct TunnelCommonFlags: Sendable {
    public var transport: TunnelTransport?
    public var heartbeatInterval: Duration?
    public var heartbeatMisses: Int?
    public var handshakeTimeout: Duration?
    public var drainTimeout: Duration?
    public var threads: Int?

    public init() {}

    /// The rules these flags must follow whatever the file says.
    public func check() throws(ConfigError) {
        if let m = heartbeatMisses, m < 1 { throw ConfigError(setting: "--heartbeat-misses", "--heartbeat-misses must be at least 1") }
        if heartbeatInterval == .zero { throw ConfigError(setting: "--heartbeat-interval", "--heartbeat-interval must be more than 0") }
        if handshakeTimeout == .zero { throw ConfigError(setting: "--handshake-timeout", "--handshake-timeout must be more than 0") }
        if let threads, threads < 1 || threads > 1024 {
            throw ConfigError(setting: "--threads", "--threads must be between 1 and 1024, got \(threads)")
        }
    }

    /// Lays the given flags over what the file (or the defaults) set.
    func apply(transport t: inout TunnelTransport, heartbeat: inout Heartbeat, handshake: inout Duration, drain: inout Duration,
               threads n: inout Int) {
        if let threads { n = threads }
        if let transport { t = transport }
        if let heartbeatInterval { heartbeat.interval = heartbeatInterval }
        if let heartbeatMisses { heartbeat.misses = heartbeatMisses }
        if let handshakeTimeout { handshake = handshakeTimeout }
        if let drainTimeout { drain = drainTimeout }
    }
}

extension TunnelConfigFile.Common {
    /// The file's log_level and log_format over the defaults.
    func logSettings() throws(ConfigError) -> LogSettings {
        var settings = LogSettings()
        if let text = logLevel {
            guard let parsed = Logger.Level(rawValue: text) else {
                throw ConfigError(setting: "log_level", "config: log_level '\(text)' is not a log level")
            }
            settings.level = parsed
        }
        if let text = logFormat {
            guard let parsed = LogFormat(rawValue: text) else {
                throw ConfigError(setting: "log_format", "config: log_format '\(text)' is not text or json")
            }
            settings.format = parsed
        }
        return settings
    }
}

extension TokenFlags {
    /// The token from the flags or the environment, else from the config file, checked by
    /// `TokenRules` wherever it came from; nil when none was given anywhere.
    func resolve(_ file: TunnelConfigFile.Common?, warnings: inout [String]) throws(ConfigError) -> String? {
        if let tokenFile { return try TokenRules.read(TokenOrigin("--token-file", path: tokenFile), warnings: &warnings) }
        if let environment { return try TokenRules.check(environment, from: TokenOrigin("CULVERT_TOKEN")) }
        if let token {
            warnings.append("--token is visible to every user in the process list; use --token-file or CULVERT_TOKEN")
            return try TokenRules.check(token, from: TokenOrigin("--token"))
        }
        guard let file else { return nil }
        if let path = file.tokenFile {
            return try TokenRules.read(TokenOrigin("token_file", configFile: file.path, path: path), warnings: &warnings)
        }
        return try file.token.map { token throws(ConfigError) in
            try TokenRules.check(token, from: TokenOrigin("token", configFile: file.path))
        }
    }
}

/// A secret service's token from the file named by `setting` (`--service-token-file`).
func readServiceToken(at path: String, setting: String, warnings: inout [String]) throws(ConfigError) -> String {
    try TokenRules.read(TokenOrigin(setting, path: path, isServiceToken: true), warnings: &warnings)
}

/// Loads a config file's part of a model, when there is a file.
func loadFile<Model>(_ path: String?, into model: inout Model,
                     _ load: (String, inout Model) throws(ConfigError) -> TunnelConfigFile.Common) throws(ConfigError) -> TunnelConfigFile.Common? {
    guard let path else { return nil }
    return try load(path, &model)
}
