/// A command's settings once its flags were laid over its config file and checked:
/// the model the service runs with, how to log, and advice found on the way that is
/// logged once the logger these settings describe exists.
public struct Resolved<Config: Sendable>: Sendable {
    public var config: Config
    public var log: LogSettings
    public var warnings: [String]

    public init(config: Config, log: LogSettings, warnings: [String] = []) {
        self.config = config
        self.log = log
        self.warnings = warnings
    }
}
