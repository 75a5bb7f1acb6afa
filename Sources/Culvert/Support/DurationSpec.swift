import Reactor

/// Parses durations as users write them: `500ms`, `5s`, `2m`, `1h`, or bare seconds
/// (`1.5`). `off` and `0` mean "no timeout" where a timeout is optional.
public enum DurationSpec {
    public struct ParseError: Error, CustomStringConvertible {
        public let input: String
        public var description: String {
            "invalid duration '\(input)': use e.g. 500ms, 5s, 2m, 1h or a number of seconds"
        }
    }

    public static func parse(_ text: String) throws(ParseError) -> Duration {
        let s = text.trimmingWhitespace().lowercased()
        let units: [(String, Double)] = [("ms", 1e-3), ("s", 1), ("m", 60), ("h", 3600)]
        var number = Substring(s)
        var scale = 1.0
        for (suffix, factor) in units where s.hasSuffix(suffix) {
            number = s.dropLast(suffix.count)
            scale = factor
            break
        }
        guard !number.isEmpty, let value = Double(number), value.isFinite, value >= 0 else {
            throw ParseError(input: text)
        }
        let nanos = value * scale * 1e9
        guard nanos < 1e18 else { throw ParseError(input: text) }
        return .nanoseconds(Int64(nanos.rounded()))
    }

    /// Like `parse`, but `off`, `none` and `0` give nil.
    public static func parseOptional(_ text: String) throws(ParseError) -> Duration? {
        let s = text.trimmingWhitespace().lowercased()
        if s == "off" || s == "none" { return nil }
        let d = try parse(text)
        return d == .zero ? nil : d
    }

    /// `1.5s`, `250ms`: how logs and messages print a duration.
    public static func format(_ d: Duration) -> String {
        let s = d.inSeconds
        if s < 1 { return "\(Int((s * 1000).rounded()))ms" }
        if s == s.rounded() { return "\(Int(s))s" }
        return "\((s * 1000).rounded() / 1000)s"
    }
}
