import Logging

/// A duration as a log value: a number of seconds in JSON (`"duration":0.012`,
/// `"deadline":30`), and in text either measured (`0.012s`) or as a setting is written
/// (`30s`, `500ms`), so text lines keep reading like the flags that set them.
public struct LoggedSeconds: CustomStringConvertible, Sendable {
    public let value: Double
    public let description: String

    /// A measured time (how long a connection lasted), to the millisecond.
    public init(nanoseconds: UInt64) {
        value = Double(nanoseconds) / 1e9
        description = "\((value * 1000).rounded() / 1000)s"
    }

    /// A configured or computed time (a deadline, a backoff), written as its setting is.
    public init(_ duration: Duration) {
        value = duration.inSeconds
        description = DurationSpec.format(duration)
    }

    /// The JSON number: seconds to the millisecond, without a fraction when whole.
    public var number: String { Self.seconds(value) }

    private static func seconds(_ value: Double) -> String {
        let ms = (value * 1000).rounded() / 1000
        if ms == ms.rounded(), abs(ms) < 1e15 { return "\(Int64(ms))" }
        return "\(ms)"
    }
}

extension Logger.MetadataValue {
    /// A duration that JSON logs write as a number of seconds.
    public static func seconds(_ duration: Duration) -> Logger.MetadataValue {
        .stringConvertible(LoggedSeconds(duration))
    }
}
