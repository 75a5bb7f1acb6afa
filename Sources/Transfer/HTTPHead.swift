/// The head of an HTTP/1.x request or response (start line and header fields), parsed
/// from the bytes up to the blank line: culvert's one HTTP head parser, for the WebSocket
/// upgrade and the HTTP proxy. The proxy forwards heads, so the fields keep their order
/// and their names as sent; look-ups ignore case.
public struct HTTPHead: Equatable, Sendable {
    /// The start line's three parts: method, target, version for a request; version,
    /// status code, reason for a response.
    public let startLine: (String, String, String)
    /// The fields in order, names as sent; a repeated field appears once per line.
    public var fields: [(name: String, value: String)]

    public init(startLine: (String, String, String), fields: [(name: String, value: String)]) {
        self.startLine = startLine
        self.fields = fields
    }

    public static func == (a: HTTPHead, b: HTTPHead) -> Bool {
        a.startLine == b.startLine && a.fields.elementsEqual(b.fields) { $0 == $1 }
    }

    // MARK: finding the end

    /// Where the head in `bytes` ends.
    public enum Scan: Equatable, Sendable {
        case incomplete
        /// The head is longer than the limit allows.
        case tooLarge
        /// The head takes `count` bytes, its blank line included.
        case complete(Int)
    }

    /// Finds the blank line that ends a head within the first `limit` bytes; `start` is
    /// how far an earlier call already looked, so a head read piece by piece is scanned once.
    public static func scan(_ bytes: [UInt8], from start: Int = 0, limit: Int = .max) -> Scan {
        let end = min(bytes.count, limit)
        var i = max(0, start - 3)
        while i + 4 <= end {
            if bytes[i] == 13 && bytes[i + 1] == 10 && bytes[i + 2] == 13 && bytes[i + 3] == 10 { return .complete(i + 4) }
            i += 1
        }
        return bytes.count >= limit ? .tooLarge : .incomplete
    }

    /// Where the head ends in `bytes` (just past the blank line), nil while incomplete.
    public static func end(in bytes: [UInt8]) -> Int? {
        guard case .complete(let n) = scan(bytes) else { return nil }
        return n
    }

    // MARK: parsing

    /// A head that is not HTTP/1.x as culvert accepts it.
    public struct Malformed: Error, Equatable, CustomStringConvertible, Sendable {
        public let reason: String
        /// A well-formed request line of another HTTP version (a 505, not a 400).
        public let unsupportedVersion: String?
        public init(reason: String, unsupportedVersion: String? = nil) {
            self.reason = reason
            self.unsupportedVersion = unsupportedVersion
        }
        public var description: String { reason }
    }

    /// Which start line a head must have.
    public enum Kind: Sendable {
        /// `METHOD TARGET HTTP/1.0|1.1`, the method in ASCII letters.
        case request
        /// `HTTP/1.x CODE [REASON]` with a three-digit code.
        case response
        /// Either, checked only for an HTTP/1.x version (the WebSocket handshake checks
        /// the rest itself, to answer with its own reasons).
        case any
    }

    /// Parses a complete head (what `scan` measured).
    public static func parse(_ bytes: ArraySlice<UInt8>, as kind: Kind) throws(Malformed) -> HTTPHead {
        guard let text = String(validating: bytes, as: UTF8.self) else { throw Malformed(reason: "head is not UTF-8") }
        // "\r\n" is one Character in Swift (a grapheme cluster).
        var lines = text.split(separator: "\r\n", omittingEmptySubsequences: false).map(String.init)
        while lines.last == "" { lines.removeLast() }
        guard let first = lines.first else { throw Malformed(reason: "empty head") }
        let parts = first.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
        let start = (parts[0], parts.count > 1 ? parts[1] : "", parts.count > 2 ? parts[2] : "")
        switch kind {
        case .request:
            if parts.count == 3, start.2.hasPrefix("HTTP/"), start.2 != "HTTP/1.1", start.2 != "HTTP/1.0" {
                throw Malformed(reason: "\(start.2) is not supported", unsupportedVersion: start.2)
            }
            guard parts.count == 3, !start.0.isEmpty, !start.1.isEmpty, start.0.allSatisfy({ $0.isLetter && $0.isASCII }),
                  start.2 == "HTTP/1.1" || start.2 == "HTTP/1.0" else {
                throw Malformed(reason: "bad request line")
            }
        case .response:
            guard parts.count >= 2, start.0.hasPrefix("HTTP/1."), start.1.count == 3, Int(start.1) != nil else {
                throw Malformed(reason: "bad status line")
            }
        case .any:
            guard parts.count >= 2, start.0.hasPrefix("HTTP/1.") || start.2.hasPrefix("HTTP/1.") else {
                throw Malformed(reason: "not an HTTP/1.x start line")
            }
        }
        var fields: [(name: String, value: String)] = []
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { throw Malformed(reason: "header line without ':'") }
            let name = String(line[..<colon])
            // Whitespace before the colon or folded lines have been used to smuggle requests.
            guard !name.isEmpty, !name.contains(where: { $0 == " " || $0 == "\t" }) else {
                throw Malformed(reason: "bad header name")
            }
            fields.append((name, line[line.index(after: colon)...].trimmingSpaces))
        }
        return HTTPHead(startLine: start, fields: fields)
    }

    /// Parses a complete head with either start line; nil when it is not HTTP/1.x.
    public static func parse(_ bytes: ArraySlice<UInt8>) -> HTTPHead? {
        try? parse(bytes, as: .any)
    }

    // MARK: reading fields

    /// Every value of the field `name` (case-insensitive), one per line.
    public func values(_ name: String) -> [String] {
        fields.filter { $0.name.caseInsensitiveEquals(name) }.map(\.value)
    }

    /// The values of every `name` field joined with ", " (RFC 9110's list rule), nil when absent.
    public func field(_ name: String) -> String? {
        let all = values(name)
        return all.isEmpty ? nil : all.joined(separator: ", ")
    }

    /// The comma-separated tokens of every `name` field, lowercased (`Connection`).
    public func tokens(_ name: String) -> Set<String> {
        Set(values(name).flatMap { $0.split(separator: ",") }.map { $0.trimmingSpaces.lowercased() })
    }

    /// Whether the comma-separated list field `name` holds `token` (case-insensitive).
    public func listField(_ name: String, contains token: String) -> Bool {
        tokens(name).contains(token.lowercased())
    }

    /// The head as bytes with `startLine` as its first line.
    public func encoded() -> [UInt8] {
        var text = "\(startLine.0) \(startLine.1) \(startLine.2)\r\n"
        for f in fields { text += "\(f.name): \(f.value)\r\n" }
        text += "\r\n"
        return Array(text.utf8)
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

    /// Equal ignoring ASCII case (header names are ASCII tokens).
    func caseInsensitiveEquals<Other: StringProtocol>(_ other: Other) -> Bool {
        utf8.count == other.utf8.count && zip(utf8, other.utf8).allSatisfy { a, b in
            a == b || (a | 0x20 == b | 0x20 && (a | 0x20) >= 0x61 && (a | 0x20) <= 0x7A)
        }
    }
}
