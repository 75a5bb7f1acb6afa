/// The head of an HTTP/1.1 request or response (start line and header fields), as the
/// WebSocket upgrade exchanges them. Only what the upgrade needs: no bodies, no chunking.
public struct HTTPHead: Equatable, Sendable {
    /// The start line's three parts: method, target, version for a request; version,
    /// status code, reason for a response.
    public let startLine: (String, String, String)
    /// Field names lower-cased, in order; a repeated field appears once per line.
    public let fields: [(name: String, value: String)]

    public static func == (a: HTTPHead, b: HTTPHead) -> Bool {
        a.startLine == b.startLine && a.fields.elementsEqual(b.fields) { $0 == $1 }
    }

    /// The values of every `name` field joined with ", " (RFC 9110's list rule), nil when absent.
    public func field(_ name: String) -> String? {
        let values = fields.filter { $0.name == name }.map(\.value)
        return values.isEmpty ? nil : values.joined(separator: ", ")
    }

    /// Whether the comma-separated list field `name` holds `token` (case-insensitive).
    public func listField(_ name: String, contains token: String) -> Bool {
        guard let value = field(name) else { return false }
        return value.split(separator: ",").contains { $0.trimmingSpaces.lowercased() == token }
    }

    /// Where the head ends in `bytes` (just past the blank line), nil while incomplete.
    public static func end(in bytes: [UInt8]) -> Int? {
        guard bytes.count >= 4 else { return nil }
        for i in 0...(bytes.count - 4) where bytes[i] == 13 && bytes[i + 1] == 10 && bytes[i + 2] == 13 && bytes[i + 3] == 10 {
            return i + 4
        }
        return nil
    }

    /// Parses a complete head (as `end(in:)` delimits it); nil when it is not HTTP/1.x.
    public static func parse(_ bytes: ArraySlice<UInt8>) -> HTTPHead? {
        guard let text = String(validating: bytes, as: UTF8.self) else { return nil }
        // "\r\n" is one Character in Swift (a grapheme cluster).
        var lines = text.split(separator: "\r\n", omittingEmptySubsequences: false).map(String.init)
        while lines.last == "" { lines.removeLast() }
        guard let first = lines.first else { return nil }
        let parts = first.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
        guard parts.count >= 2 else { return nil }
        let start = (parts[0], parts[1], parts.count > 2 ? parts[2] : "")
        guard start.0.hasPrefix("HTTP/1.") || start.2.hasPrefix("HTTP/1.") else { return nil }
        var fields: [(name: String, value: String)] = []
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":"), colon != line.startIndex else { return nil }
            let name = line[..<colon]
            guard !name.contains(" ") && !name.contains("\t") else { return nil }
            fields.append((name.lowercased(), line[line.index(after: colon)...].trimmingSpaces))
        }
        return HTTPHead(startLine: start, fields: fields)
    }

    public init(startLine: (String, String, String), fields: [(name: String, value: String)]) {
        self.startLine = startLine
        self.fields = fields
    }
}

extension StringProtocol {
    /// Without leading and trailing spaces and tabs (HTTP's optional whitespace).
    var trimmingSpaces: String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\t" { s = s.dropFirst() }
        while let c = s.last, c == " " || c == "\t" { s = s.dropLast() }
        return String(s)
    }
}
