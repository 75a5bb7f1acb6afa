#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization

/// How log lines look on stderr.
public enum LogFormat: String, CaseIterable, Sendable {
    /// `info connection closed peer=127.0.0.1:5000 up=10 ...`: for people.
    case text
    /// One JSON object per line with `ts`, `level`, `msg` and the metadata: for machines.
    case json
}

/// Writes log lines to stderr, one `write(2)` per line so concurrent loops never
/// interleave within a line. Metadata keys come out in a fixed order (connection fields
/// first) so lines are easy to read and to grep.
///
/// Values and messages may carry text from peers (service names, refusal reasons), so
/// no control character (C0, DEL, C1) is ever written raw: a newline could forge a line
/// and an ESC could drive the terminal. In text format a value that is empty or holds a
/// space, `"`, `=`, `\` or a control character is written as a JSON string (`\n`, `\t`,
/// `\u001b`); so an unquoted value is always literal. The message keeps its spaces and
/// quotes but has its control characters escaped the same way.
public struct StderrLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    public var logLevel: Logger.Level
    private let format: LogFormat

    private static let keyOrder = ["listen", "peer", "target", "up", "down", "duration", "reason", "error"]

    public init(level: Logger.Level, format: LogFormat) {
        self.logLevel = level
        self.format = format
    }

    /// Installs the handler for every `Logger` in the process.
    public static func bootstrap(level: Logger.Level, format: LogFormat) {
        LoggingSystem.bootstrap { _ in StderrLogHandler(level: level, format: format) }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        writeLine(line(for: event), to: 2)
    }

    /// The line `event` is written as, without the newline.
    func line(for event: LogEvent) -> String {
        var all = metadata
        if let extra = event.metadata { all.merge(extra) { _, new in new } }
        let keys = all.keys.sorted { l, r in
            let li = Self.keyOrder.firstIndex(of: l) ?? Self.keyOrder.count
            let ri = Self.keyOrder.firstIndex(of: r) ?? Self.keyOrder.count
            return li != ri ? li < ri : l < r
        }
        var line: String
        switch format {
        case .text:
            line = "\(event.level.rawValue) \(Self.textMessage(event.message.description))"
            for key in keys { line += " \(key)=\(Self.textValue(all[key]!))" }
        case .json:
            line = "{\"ts\":\"\(Self.timestamp())\",\"level\":\"\(event.level.rawValue)\",\"msg\":\(Self.jsonString(event.message.description))"
            for key in keys { line += ",\(Self.jsonString(key)):\(Self.jsonValue(all[key]!))" }
            line += "}"
        }
        return line
    }

    static func textValue(_ v: Logger.Metadata.Value) -> String {
        let s = v.description
        if s.isEmpty || s.unicodeScalars.contains(where: { " \"=\\".unicodeScalars.contains($0) || isControl($0) }) {
            return jsonString(s)
        }
        return s
    }

    static func textMessage(_ s: String) -> String {
        guard s.unicodeScalars.contains(where: isControl) else { return s }
        var out = ""
        for scalar in s.unicodeScalars {
            if isControl(scalar) { appendEscaped(scalar, to: &out) } else { out.unicodeScalars.append(scalar) }
        }
        return out
    }

    /// C0 controls, DEL and the C1 range (U+0080-U+009F, which some terminals read as
    /// escape sequences, e.g. U+009B as CSI).
    static func isControl(_ scalar: Unicode.Scalar) -> Bool {
        scalar.value < 0x20 || (0x7f...0x9f).contains(scalar.value)
    }

    /// A control character as JSON writes it: the short forms for newline, return and
    /// tab, `\u00XX` for the others.
    private static func appendEscaped(_ scalar: Unicode.Scalar, to out: inout String) {
        switch scalar {
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        default:
            let hex = String(scalar.value, radix: 16)
            out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
        }
    }

    private static func jsonValue(_ v: Logger.Metadata.Value) -> String {
        switch v {
        case .string(let s): return jsonString(s)
        case .stringConvertible(let c):
            let s = c.description
            if let seconds = c as? LoggedSeconds { return seconds.number }
            if c is any BinaryInteger || c is Double { return s }
            return jsonString(s)
        case .array(let items): return "[" + items.map(jsonValue).joined(separator: ",") + "]"
        case .dictionary(let d):
            return "{" + d.keys.sorted().map { "\(jsonString($0)):\(jsonValue(d[$0]!))" }.joined(separator: ",") + "}"
        }
    }

    static func jsonString(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            default:
                if isControl(scalar) { appendEscaped(scalar, to: &out) } else { out.unicodeScalars.append(scalar) }
            }
        }
        return out + "\""
    }

    private static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = ts.tv_sec
        var tmv = tm()
        gmtime_r(&t, &tmv)
        func pad(_ v: Int32, _ w: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, w - s.count)) + s
        }
        return "\(pad(tmv.tm_year + 1900, 4))-\(pad(tmv.tm_mon + 1, 2))-\(pad(tmv.tm_mday, 2))T" +
            "\(pad(tmv.tm_hour, 2)):\(pad(tmv.tm_min, 2)):\(pad(tmv.tm_sec, 2)).\(pad(Int32(ts.tv_nsec / 1_000_000), 3))Z"
    }
}

/// Writes ready lines to stdout and flushes at once: scripts wait for them.
public enum ReadyLine {
    private static let lock = Mutex<Void>(())

    public static func print(_ line: String) {
        lock.withLock { _ in writeLine(line, to: 1) }
    }
}

/// Writes `line` and a newline with one write(2) where the kernel allows, unbuffered.
func writeLine(_ line: String, to fd: Int32) {
    let bytes = Array((line + "\n").utf8)
    bytes.withUnsafeBytes { buf in
        var offset = 0
        while offset < buf.count {
            let n = write(fd, buf.baseAddress! + offset, buf.count - offset)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            offset += n
        }
    }
}
