import COpenSSL

/// The HTTP/1.1 upgrade that opens a WebSocket (RFC 6455 section 4), for both ends: the
/// pure request/answer logic, and its exchange over a connection in its control phase
/// (`AsyncDuplex`). Bytes that arrive behind the head (a peer may send its first frames
/// at once) are handed back for the `WebSocketStream` to read first.
public enum WebSocketHandshake {
    /// The GUID RFC 6455 appends to the key before hashing.
    static let guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    /// The largest request or response head taken; a longer one is refused.
    public static let maxHeadLength = 16 * 1024

    /// `Sec-WebSocket-Accept` for `key`: base64(SHA-1(key + GUID)).
    public static func acceptValue(forKey key: String) -> String {
        let input = Array((key + guid).utf8)
        var digest = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var length: UInt32 = 0
        _ = EVP_Digest(input, input.count, &digest, &length, EVP_sha1(), nil)
        return base64(Array(digest.prefix(Int(length))))
    }

    /// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
    public static func newKey() -> String {
        var nonce = [UInt8](repeating: 0, count: 16)
        _ = RAND_bytes(&nonce, 16)
        return base64(nonce)
    }

    /// Standard base64 with padding (also HTTP Basic credentials).
    public static func base64(_ bytes: [UInt8]) -> String {
        var out = [UInt8](repeating: 0, count: (bytes.count + 2) / 3 * 4 + 1)
        let n = EVP_EncodeBlock(&out, bytes, Int32(bytes.count))
        return String(decoding: out.prefix(Int(n)), as: UTF8.self)
    }

    /// Whether `key` is base64 of 16 bytes, as RFC 6455 requires.
    static func isValidKey(_ key: String) -> Bool {
        let bytes = Array(key.utf8)
        guard bytes.count == 24, bytes[22] == UInt8(ascii: "="), bytes[23] == UInt8(ascii: "=") else { return false }
        var out = [UInt8](repeating: 0, count: 18)
        return EVP_DecodeBlock(&out, bytes, 24) == 18
    }

    // MARK: server

    /// How a server answers one request head.
    public enum Answer: Equatable, Sendable {
        /// 101 Switching Protocols: the connection is a WebSocket from the next byte on.
        case upgrade(response: [UInt8])
        /// A plain HTTP refusal; `reason` is what the log line says.
        case refuse(status: Int, reason: String, response: [UInt8])
    }

    /// The answer to `head` for a server that upgrades requests for `path` only (the
    /// query string is ignored). Any other path gets 404 before the upgrade is even
    /// looked at, so the path can serve as a shared secret.
    /// `extra` gives the header lines a 101 answer to that request carries beyond the
    /// upgrade's own; it is asked only when the request upgrades.
    public static func answer(_ head: HTTPHead?, path: String, extra: (HTTPHead) -> [String] = { _ in [] }) -> Answer {
        guard let head else { return refusal(400, "not an HTTP/1.1 request") }
        let (method, target, version) = head.startLine
        guard version == "HTTP/1.1" else { return refusal(400, "not an HTTP/1.1 request (\(version))") }
        let requested = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        guard requested == path else { return refusal(404, "no WebSocket endpoint at this path") }
        guard method == "GET" else { return refusal(400, "method \(method) instead of GET") }
        guard head.listField("upgrade", contains: "websocket") else {
            return refusal(426, "no WebSocket upgrade requested (Upgrade header missing)",
                           extra: ["Upgrade: websocket", "Connection: Upgrade"])
        }
        guard head.listField("connection", contains: "upgrade") else {
            return refusal(400, "Connection header does not include Upgrade")
        }
        guard head.field("host") != nil else { return refusal(400, "Host header missing") }
        guard head.field("sec-websocket-version") == "13" else {
            return refusal(426, "unsupported WebSocket version \(head.field("sec-websocket-version") ?? "(none)")",
                           extra: ["Sec-WebSocket-Version: 13"])
        }
        guard let key = head.field("sec-websocket-key"), isValidKey(key) else {
            return refusal(400, "Sec-WebSocket-Key missing or not 16 bytes of base64")
        }
        var response = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Accept: \(acceptValue(forKey: key))\r\n"
        for line in extra(head) { response += line + "\r\n" }
        return .upgrade(response: Array((response + "\r\n").utf8))
    }

    private static func refusal(_ status: Int, _ reason: String, extra: [String] = []) -> Answer {
        let text = statusText[status] ?? "Error"
        let body = "\(status) \(text): \(reason)\n"
        var response = "HTTP/1.1 \(status) \(text)\r\nContent-Type: text/plain\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n"
        for line in extra { response += line + "\r\n" }
        response += "\r\n" + body
        return .refuse(status: status, reason: reason, response: Array(response.utf8))
    }

    private static let statusText = [400: "Bad Request", 404: "Not Found", 426: "Upgrade Required", 431: "Request Header Fields Too Large"]

    /// Reads the request on `channel` and answers it. Returns the bytes that followed the
    /// head; throws `WebSocketRefusal` after sending the refusal (the caller closes).
    /// `extra` as for `answer`.
    public static func accept(on channel: AsyncDuplex, path: String,
                              extra: (HTTPHead) -> [String] = { _ in [] }) async throws -> [UInt8] {
        let (head, leftover): (HTTPHead?, [UInt8])
        do {
            (head, leftover) = try await readHead(from: channel)
        } catch let tooLong as HeadTooLong {
            guard case .refuse(_, _, let response) = refusal(431, "request head longer than \(tooLong.limit) bytes") else { return [] }
            channel.send(response)
            try await channel.flush()
            throw WebSocketRefusal(status: 431, reason: "request head longer than \(tooLong.limit) bytes")
        }
        switch answer(head, path: path, extra: extra) {
        case .upgrade(let response):
            channel.send(response)
            try await channel.flush()
            return leftover
        case .refuse(let status, let reason, let response):
            channel.send(response)
            try await channel.flush()
            throw WebSocketRefusal(status: status, reason: reason)
        }
    }

    // MARK: client

    /// What a client puts in its upgrade request.
    public struct Request: Sendable {
        /// The Host header (the URL's authority unless overridden).
        public var host: String
        public var path: String
        /// Extra header lines, sent as given.
        public var headers: [(name: String, value: String)]

        public init(host: String, path: String, headers: [(name: String, value: String)] = []) {
            self.host = host
            self.path = path
            self.headers = headers
        }

        public func encoded(key: String) -> [UInt8] {
            var text = "GET \(path) HTTP/1.1\r\nHost: \(host)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + "Sec-WebSocket-Key: \(key)\r\nSec-WebSocket-Version: 13\r\n"
            for (name, value) in headers { text += "\(name): \(value)\r\n" }
            return Array((text + "\r\n").utf8)
        }
    }

    /// Checks a server's answer to a request sent with `key` and returns it; the error
    /// names the likely cause.
    @discardableResult
    public static func check(response head: HTTPHead?, key: String) throws(WebSocketHandshakeError) -> HTTPHead {
        guard let head, head.startLine.0.hasPrefix("HTTP/1.") else {
            throw WebSocketHandshakeError("the server did not answer with HTTP: is this a WebSocket endpoint (wss:// for TLS, ws:// for plain)?")
        }
        let status = Int(head.startLine.1) ?? 0
        let said = "the server answered HTTP \(head.startLine.1) \(head.startLine.2)"
        switch status {
        case 101:
            break
        case 200..<300, 400, 426:
            throw WebSocketHandshakeError("\(said) instead of 101 Switching Protocols: the reverse proxy did not pass the WebSocket upgrade; it needs HTTP/1.1 and the Upgrade/Connection headers (nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\")")
        case 300..<400:
            throw WebSocketHandshakeError("\(said): a redirect\(head.field("location").map { " to \($0)" } ?? ""); use the final URL (ws:// vs wss://, path)")
        case 401, 403, 407:
            throw WebSocketHandshakeError("\(said): the server or a proxy wants credentials; add them with --header")
        case 404:
            throw WebSocketHandshakeError("\(said): no WebSocket endpoint at this path; check the URL's path against the server's --ws-path")
        case 502, 503, 504:
            throw WebSocketHandshakeError("\(said): the reverse proxy could not reach the WebSocket server behind it")
        default:
            throw WebSocketHandshakeError("\(said) instead of 101 Switching Protocols")
        }
        guard head.listField("upgrade", contains: "websocket"), head.listField("connection", contains: "upgrade") else {
            throw WebSocketHandshakeError("\(said) without Upgrade: websocket and Connection: Upgrade; a proxy on the way mangled the upgrade")
        }
        guard head.field("sec-websocket-accept") == acceptValue(forKey: key) else {
            throw WebSocketHandshakeError("\(said) with a wrong Sec-WebSocket-Accept; a proxy on the way answered for the server")
        }
        if let ext = head.field("sec-websocket-extensions") {
            throw WebSocketHandshakeError("\(said) with extensions we did not ask for (\(ext))")
        }
        return head
    }

    /// Sends the upgrade request on `channel` and checks the answer; returns the bytes
    /// that followed the answer's head, and the head for fields beyond the upgrade's.
    public static func connect(on channel: AsyncDuplex, request: Request) async throws -> (leftover: [UInt8], answer: HTTPHead) {
        let key = newKey()
        channel.send(request.encoded(key: key))
        try await channel.flush()
        let (head, leftover): (HTTPHead?, [UInt8])
        do {
            (head, leftover) = try await readHead(from: channel)
        } catch is HeadTooLong {
            throw WebSocketHandshakeError("the server's answer head is longer than \(maxHeadLength) bytes; not a WebSocket endpoint?")
        } catch ChannelError.eof {
            throw WebSocketHandshakeError("the server closed the connection without answering the WebSocket upgrade: a culvert server on --transport tls or plain (give it as HOST:PORT, or run it with --transport ws), ws:// to a TLS port, or a proxy that drops upgrades")
        }
        return (leftover, try check(response: head, key: key))
    }

    // MARK: reading a head

    struct HeadTooLong: Error { let limit: Int }

    /// Reads until the blank line that ends a head; returns the parsed head (nil when not
    /// HTTP/1.x) and whatever was read past it.
    static func readHead(from channel: AsyncDuplex) async throws -> (HTTPHead?, [UInt8]) {
        var bytes: [UInt8] = []
        while true {
            bytes += try await channel.read(max: 4096)
            // The end may arrive in the read that crosses the limit: the head is still too long.
            let end = HTTPHead.end(in: bytes)
            if (end ?? bytes.count) > maxHeadLength { throw HeadTooLong(limit: maxHeadLength) }
            if let end { return (HTTPHead.parse(bytes[..<end]), Array(bytes[end...])) }
        }
    }
}

/// The server refused an upgrade request (and has sent its plain HTTP answer).
public struct WebSocketRefusal: Error, CustomStringConvertible, Sendable {
    public let status: Int
    public let reason: String
    public var description: String { "HTTP \(status): \(reason)" }
}

/// The client's upgrade failed; the message names the likely cause.
public struct WebSocketHandshakeError: Error, CustomStringConvertible, Sendable, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
