#if canImport(Glibc)
import Glibc
#endif
import Transfer

/// One end on `--transport plain`, the other on TLS: each recognises the other's first
/// bytes before its own parser turns them into a garbled frame or a broken TLS record,
/// and says which setting differs. A server that finds a mismatch answers with a plain
/// `refused` frame (`transportMismatch`), which a client of either transport recognises.
struct TransportMismatch: Error, CustomStringConvertible {
    let description: String

    /// Bytes a frame header and a TLS record header both fit in.
    private static let headerSize = 5

    static let clientSpeaksTLS = TransportMismatch(
        description: "the client speaks TLS; this server uses --transport plain (drop --transport plain here, or give it to the client too)")
    static let clientSpeaksPlain = TransportMismatch(
        description: "the client uses --transport plain; this server uses TLS (drop --transport plain on the client, or give it to the server too)")
    static let serverUsesTLS = "the server uses TLS; drop --transport plain"
    static let serverUsesPlain = "the server uses --transport plain; give --transport plain on the client too"
    static let serverUsesWebSocket = "the server speaks WebSocket (--transport ws/wss); give the server as ws://HOST:PORT/PATH (or wss://…) and drop --transport"

    /// Whether a `transportMismatch` refusal's reason comes from a ws/wss server, which
    /// refuses tls and plain clients alike (`clientSpeaksTunnel`).
    static func fromWebSocketServer(_ reason: String) -> Bool { reason.contains("--transport ws/wss") }

    /// Whether the refusal frame at the head of `fd`'s input (peeked, not consumed) comes
    /// from a ws/wss server. The server sends its refusal in one write, so it has arrived
    /// whole once its first bytes have.
    static func peekedRefusalFromWebSocketServer(_ fd: Int32) -> Bool {
        var bytes = [UInt8](repeating: 0, count: 1024)
        let n = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_PEEK | MSG_DONTWAIT)) }
        return n > 0 && fromWebSocketServer(String(decoding: bytes[..<n], as: UTF8.self))
    }

    /// The start of an HTTP request: a ws:// client's upgrade.
    static func isHTTPRequest(_ head: [UInt8]) -> Bool { head.starts(with: "GET ".utf8) }

    /// Ends a ws:// client's upgrade on a plain or TLS server without an answer (a plain
    /// server never answers garbage) but with FIN, not a reset, which the client's error
    /// explains; returns the error the server logs.
    static func refuseWebSocket(_ fd: Int32, serverTransport: String) -> TransportMismatch {
        drain(fd)
        return TransportMismatch(description: "the client speaks WebSocket (a ws:// URL); this server uses --transport \(serverTransport) "
            + "(give the client HOST:PORT, or run the server with --transport ws)")
    }

    /// A TLS record header: handshake (ClientHello, ServerHello) or alert, version 3.0 to 3.4.
    static func isTLSRecord(_ head: [UInt8]) -> Bool {
        head.count >= 3 && (head[0] == 0x16 || head[0] == 0x15) && head[1] == 0x03 && head[2] <= 0x04
    }

    /// A frame header (u32 length within the limit, then a type) whose type belongs to `set`.
    static func isFrame<F: TunnelProtocol.FrameSet>(_ head: [UInt8], of set: F.Type) -> Bool {
        guard head.count >= headerSize else { return false }
        let length = Int(UInt32(head[0]) << 24 | UInt32(head[1]) << 16 | UInt32(head[2]) << 8 | UInt32(head[3]))
        return length >= 1 && length <= TunnelProtocol.maxFrame && F.Code(rawValue: head[4]) != nil
    }

    /// The first bytes already received on `fd`, left in place for whoever reads next;
    /// empty when none have arrived, nil at end of stream or on an error.
    static func peek(_ fd: Int32) -> [UInt8]? {
        var head = [UInt8](repeating: 0, count: headerSize)
        let n = head.withUnsafeMutableBytes { recv(fd, $0.baseAddress, headerSize, Int32(MSG_PEEK | MSG_DONTWAIT)) }
        if n > 0 { return Array(head[..<n]) }
        return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? [] : nil
    }

    /// Waits for the peer's first bytes on `channel` without consuming them: a header's
    /// worth, or fewer when the peer stops sending (then whatever came, or nil at its end).
    static func firstBytes(of channel: AsyncDuplex) async throws -> [UInt8]? {
        while true {
            guard let head = peek(channel.duplex.fd) else { return nil }
            if head.count >= headerSize { return head }
            try await channel.waitForReadiness()
        }
    }

    /// Answers a client of the other transport with a plain `refused` frame, which it can
    /// read whichever transport it uses (see the type's comment), and returns the error
    /// that ends the connection. What the client sent is read and dropped first, so the
    /// close that follows sends FIN, not a reset that could discard the answer.
    static func refuse(_ fd: Int32, _ mismatch: TransportMismatch) -> TransportMismatch {
        drain(fd)
        let frame = TunnelProtocol.encode(TunnelProtocol.ServerHandshake.refused(.init(.transportMismatch, mismatch.description)))
        _ = frame.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
        return mismatch
    }

    /// Reads and drops what the client sent, so that closing sends FIN, not a reset.
    private static func drain(_ fd: Int32) {
        var sink = [UInt8](repeating: 0, count: 4096)
        for _ in 0..<16 {
            guard sink.withUnsafeMutableBytes({ recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }) > 0 else { break }
        }
    }
}
