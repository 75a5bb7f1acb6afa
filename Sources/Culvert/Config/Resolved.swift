/// A command's settings once its flags were laid over its config file and checked:
/// the model the service runs with, how to log, and advice found on the way that is
/// logged once the logger these settings describe exists.
public struct Resolved<Config: Sendable>: Sendable {
    public var config: Config
    public var log: LogSettings
    public var warnings: [String]
    /// The config file's `admin` and `admin_token_file`, which the command line's
    /// `--admin` and `--admin-token-file` override (read at start; a reload keeps the
    /// endpoint as it is).
    public var admin: AdminFlags

    public init(config: Config, log: LogSettings, warnings: [String] = [], admin: AdminFlags = AdminFlags()) {
        self.config = config
        self.log = log
        self.warnings = warnings
        self.admin = admin
    }
}
