/// A setting that cannot be used. Commands print its description and exit with status 2;
/// `key` lets a caller that is not a person (a reload, a test) tell which setting it was.
public struct ConfigError: Error, CustomStringConvertible, Sendable {
    /// The config file at fault; nil when the flags, the environment, or the two sources
    /// together are.
    public let file: String?
    /// The key (`services.ssh.local`) or flag (`--max-clients`) at fault; nil when the
    /// problem is the file as a whole.
    public let key: String?
    public let message: String

    /// A problem inside a config file; the description names the file and the key.
    public init(file: String, key: String?, message: String) {
        self.file = file
        self.key = key
        self.message = message
    }

    /// A problem outside any one file; `message` names the flag or key itself, as people
    /// read it without the rest of this error.
    public init(setting key: String?, _ message: String) {
        self.file = nil
        self.key = key
        self.message = message
    }

    public var description: String {
        guard let file else { return message }
        if let key { return "config \(file): \(key): \(message)" }
        return "config \(file): \(message)"
    }
}
