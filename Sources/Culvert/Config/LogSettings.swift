import Logging

/// How a command logs: the least severe level written and the line format.
public struct LogSettings: Equatable, Sendable {
    public var level: Logger.Level = .info
    public var format: LogFormat = .text
    public init() {}
}

/// `--log-level` and `--log-format`, nil when not given.
public struct LogFlags: Sendable {
    public var level: Logger.Level?
    public var format: LogFormat?

    public init(level: Logger.Level? = nil, format: LogFormat? = nil) {
        self.level = level
        self.format = format
    }

    /// The given flags laid over `base` (a config file's settings, or the defaults).
    func over(_ base: LogSettings) -> LogSettings {
        var settings = base
        if let level { settings.level = level }
        if let format { settings.format = format }
        return settings
    }
}
