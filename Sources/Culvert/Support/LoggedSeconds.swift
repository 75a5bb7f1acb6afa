/// A duration that logs as `0.012s` in text and as a plain number of seconds in JSON.
public struct LoggedSeconds: CustomStringConvertible, Sendable {
    public let value: Double
    public init(nanoseconds: UInt64) { value = Double(nanoseconds) / 1e9 }
    public var number: String {
        let ms = (value * 1000).rounded() / 1000
        return "\(ms)"
    }
    public var description: String { number + "s" }
}
