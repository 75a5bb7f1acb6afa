/// An HTTP/1.x message head (request or status line, then header fields), parsed from
/// the bytes up to the blank line; culvert forwards messages, so it keeps the fields in
/// order and as sent, and only reads the few it acts on.
public struct ProxyHTTPHead: Equatable, Sendable {
    /// Method, request target and version for a request; version, status code and
    /// reason for a response.
    public let start: (String, String, String)
    public var fields: [(name: String, value: String)]

    public static func == (l: ProxyHTTPHead, r: ProxyHTTPHead) -> Bool {
        l.start == r.start && l.fields.map(\.name) == r.fields.map(\.name) && l.fields.map(\.value) == r.fields.map(\.value)
    }

    /// Where the head in `bytes` ends.
    public enum Scan: Equatable {
        case incomplete
        /// The head is longer than the limit allows.
        case tooLarge
        /// The head takes `count` bytes, its blank line included.
        case complete(Int)
    }

    /// Finds the blank line that ends a head within the first `limit` bytes.
    public static func scan(_ bytes: [UInt8], from start: Int = 0, limit: Int) -> Scan {
        let end = min(bytes.count, limit)
        var i = max(0, start - 3)
        while i + 4 <= end {
            if bytes[i] == 13 && bytes[i + 1] == 10 && bytes[i + 2] == 13 && bytes[i + 3] == 10 { return .complete(i + 4) }
            i += 1
        }
        return bytes.count >= limit ? .tooLarge : .incomplete
    }

    /// A head that is not HTTP/1.x as culvert accepts it.
    public struct Malformed: Error, Equatable, CustomStringConvertible {
        public let reason: String
        public var description: String { reason }
    }

    /// Parses a complete head (what `scan` measured). For a request, `start` is
    /// (method, target, version); for a response, (version, code, reason).
    public static func parse(_ bytes: ArraySlice<UInt8>, response: Bool = false) throws(Malformed) -> ProxyHTTPHead {
        guard let text = String(validating: bytes, as: UTF8.self) else { throw Malformed(reason: "head is not UTF-8") }
        var lines = text.split(separator: "\r\n", omittingEmptySubsequences: false).map(String.init)
        while lines.last == "" { lines.removeLast() }
        guard let first = lines.first else { throw Malformed(reason: "empty head") }
        let parts = first.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
        let start: (String, String, String)
        if response {
            guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), parts[1].count == 3, Int(parts[1]) != nil else {
                throw Malformed(reason: "bad status line")
            }
            start = (parts[0], parts[1], parts.count == 3 ? parts[2] : "")
        } else {
            guard parts.count == 3, !parts[0].isEmpty, !parts[1].isEmpty,
                  parts[0].allSatisfy({ $0.isLetter && $0.isASCII }), parts[2] == "HTTP/1.1" || parts[2] == "HTTP/1.0" else {
                throw Malformed(reason: "bad request line")
            }
            start = (parts[0], parts[1], parts[2])
        }
        var fields: [(name: String, value: String)] = []
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { throw Malformed(reason: "header line without ':'") }
            let name = String(line[..<colon])
            // Whitespace before the colon or folded lines have been used to smuggle requests.
            guard !name.isEmpty, !name.contains(where: { $0 == " " || $0 == "\t" }) else {
                throw Malformed(reason: "bad header name")
            }
            fields.append((name, String(line[line.index(after: colon)...]).trimmingWhitespace()))
        }
        return ProxyHTTPHead(start: start, fields: fields)
    }

    /// Every value of the field `name` (case-insensitive).
    public func values(_ name: String) -> [String] {
        let lower = name.lowercased()
        return fields.filter { $0.name.lowercased() == lower }.map(\.value)
    }

    /// The comma-separated tokens of every `name` field, lowercased (`Connection`).
    public func tokens(_ name: String) -> Set<String> {
        Set(values(name).flatMap { $0.split(separator: ",") }.map { String($0).trimmingWhitespace().lowercased() })
    }

    /// The head without hop-by-hop fields (RFC 9110 §7.6.1): the fixed ones and those
    /// `Connection` names. `Transfer-Encoding` stays: culvert passes bodies through
    /// unchanged, chunked encoding included.
    public func removingHopByHop() -> ProxyHTTPHead {
        var drop: Set<String> = ["connection", "keep-alive", "proxy-connection", "proxy-authorization",
                                 "proxy-authenticate", "te", "trailer", "upgrade"]
        drop.formUnion(tokens("Connection").subtracting(["transfer-encoding"]))
        var out = self
        out.fields = fields.filter { !drop.contains($0.name.lowercased()) }
        return out
    }

    /// The head as bytes with `start` as its first line.
    public func encoded() -> [UInt8] {
        var text = "\(start.0) \(start.1) \(start.2)\r\n"
        for f in fields { text += "\(f.name): \(f.value)\r\n" }
        text += "\r\n"
        return Array(text.utf8)
    }
}
