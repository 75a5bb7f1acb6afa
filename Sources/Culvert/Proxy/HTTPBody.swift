import Transfer

/// How the body of an HTTP/1.x message is delimited (RFC 9112 §6), which decides where
/// the next message on a kept-alive connection starts.
public enum HTTPBody: Equatable, Sendable {
    case none
    case length(Int)
    case chunked
    /// The body runs until the sender closes (responses only); the connection ends with it.
    case untilClose

    /// A request's body. Both `Transfer-Encoding` and `Content-Length`, or two lengths
    /// that differ, are refused: they are how requests are smuggled past proxies.
    public static func of(request head: HTTPHead) throws(HTTPHead.Malformed) -> HTTPBody {
        try framing(head, otherwise: .none)
    }

    /// A response's body, given the method of the request it answers.
    public static func of(response head: HTTPHead, method: String) throws(HTTPHead.Malformed) -> HTTPBody {
        let code = Int(head.startLine.1) ?? 0
        if method == "HEAD" || (100..<200).contains(code) || code == 204 || code == 304 { return .none }
        return try framing(head, otherwise: .untilClose)
    }

    private static func framing(_ head: HTTPHead, otherwise: HTTPBody) throws(HTTPHead.Malformed) -> HTTPBody {
        let encodings = head.tokens("Transfer-Encoding")
        let lengths = Set(head.values("Content-Length").flatMap { $0.split(separator: ",") }.map { String($0).trimmingWhitespace() })
        if !encodings.isEmpty {
            guard lengths.isEmpty else { throw HTTPHead.Malformed(reason: "both Transfer-Encoding and Content-Length") }
            guard head.values("Transfer-Encoding").last?.lowercased().hasSuffix("chunked") == true else {
                throw HTTPHead.Malformed(reason: "Transfer-Encoding without chunked last")
            }
            return .chunked
        }
        guard let length = lengths.first else { return otherwise }
        guard lengths.count == 1, let n = Int(length), n >= 0, length.allSatisfy(\.isASCII) else {
            throw HTTPHead.Malformed(reason: "bad Content-Length")
        }
        return n == 0 ? .none : .length(n)
    }
}

/// Follows a chunked body (RFC 9112 §7.1) as it passes through, byte by byte, to find
/// where it ends; the bytes themselves are forwarded unchanged.
public struct ChunkedScanner: Sendable {
    /// What the scanner expects next.
    private enum State: Sendable {
        /// Hex digits of a chunk size.
        case size(value: Int, digits: Int)
        /// A chunk extension, skipped to the end of the line.
        case sizeExtension(value: Int)
        case sizeLF(value: Int)
        /// `left` bytes of chunk data.
        case data(left: Int)
        case dataCR
        case dataLF
        /// The start of a trailer line or of the final blank line.
        case trailerStart
        case trailerLine
        case trailerLF
        case lastLF
        case done
    }

    private var state = State.size(value: 0, digits: 0)

    public init() {}

    public var isDone: Bool {
        if case .done = state { return true }
        return false
    }

    /// Scans `bytes` and returns how many belong to the body (all of them unless the
    /// body ends inside).
    public mutating func feed(_ bytes: ArraySlice<UInt8>) throws(HTTPHead.Malformed) -> Int {
        var i = bytes.startIndex
        while i < bytes.endIndex {
            let c = bytes[i]
            switch state {
            case .done:
                return i - bytes.startIndex
            case .data(let left):
                let take = min(left, bytes.endIndex - i)
                state = take == left ? .dataCR : .data(left: left - take)
                i += take
                continue
            case .size(let value, let digits):
                if let d = hexValue(c) {
                    // 15 hex digits is far beyond any real chunk and cannot overflow an Int.
                    guard digits < 15 else { throw HTTPHead.Malformed(reason: "chunk size too large") }
                    state = .size(value: value << 4 | d, digits: digits + 1)
                } else if digits > 0 && (c == UInt8(ascii: ";") || c == UInt8(ascii: " ") || c == UInt8(ascii: "\t")) {
                    state = .sizeExtension(value: value)
                } else if digits > 0 && c == 13 {
                    state = .sizeLF(value: value)
                } else {
                    throw HTTPHead.Malformed(reason: "bad chunk size")
                }
            case .sizeExtension(let value):
                if c == 13 { state = .sizeLF(value: value) }
            case .sizeLF(let value):
                guard c == 10 else { throw HTTPHead.Malformed(reason: "bad chunk size line") }
                state = value == 0 ? .trailerStart : .data(left: value)
            case .dataCR:
                guard c == 13 else { throw HTTPHead.Malformed(reason: "chunk data longer than its size") }
                state = .dataLF
            case .dataLF:
                guard c == 10 else { throw HTTPHead.Malformed(reason: "chunk data longer than its size") }
                state = .size(value: 0, digits: 0)
            case .trailerStart:
                state = c == 13 ? .lastLF : .trailerLine
            case .trailerLine:
                if c == 13 { state = .trailerLF }
            case .trailerLF:
                guard c == 10 else { throw HTTPHead.Malformed(reason: "bad trailer line") }
                state = .trailerStart
            case .lastLF:
                guard c == 10 else { throw HTTPHead.Malformed(reason: "bad end of chunked body") }
                state = .done
            }
            i += 1
        }
        return i - bytes.startIndex
    }

    private func hexValue(_ c: UInt8) -> Int? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return Int(c - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return Int(c - UInt8(ascii: "a") + 10)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return Int(c - UInt8(ascii: "A") + 10)
        default: return nil
        }
    }
}
