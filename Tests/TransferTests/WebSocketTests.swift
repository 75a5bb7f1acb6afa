import Glibc
import Reactor
import Synchronization
import XCTest
@testable import Transfer

/// An in-memory stream: reads take what the test put in `incoming`; writes append to
/// `written`, at most `writeLimit` bytes per call, and answer would-block while `blocked`.
private final class MemoryDuplex: Duplex {
    let fd: Int32 = -1
    var readReady = true
    var writeReady = true
    var isSpliceable: Bool { false }
    var incoming: [UInt8] = []
    var incomingEOF = false
    var written: [UInt8] = []
    var writeLimit = Int.max
    var blocked = false
    var closedWithReset: Bool?

    func read(into buffer: UnsafeMutableRawPointer, count: Int) -> IOResult {
        if incoming.isEmpty { return incomingEOF ? .eof : .wouldBlock }
        let n = min(count, incoming.count)
        incoming.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: n) }
        incoming.removeFirst(n)
        return .bytes(n)
    }

    func write(from buffer: UnsafeRawPointer, count: Int) -> IOResult {
        if blocked { return .wouldBlock }
        let n = min(count, writeLimit)
        written += UnsafeRawBufferPointer(start: buffer, count: n)
        return .bytes(n)
    }

    func shutdownWrite() -> SystemError? { nil }
    func close(reset: Bool) { closedWithReset = reset }
}

/// Reads everything `stream` yields until it would block; the final result too.
private func drain(_ stream: WebSocketStream) -> ([UInt8], IOResult) {
    var got: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let r = buf.withUnsafeMutableBytes { stream.read(into: $0.baseAddress!, count: $0.count) }
        guard case .bytes(let n) = r else { return (got, r) }
        got += buf[0..<n]
    }
}

/// Decodes a run of server-side (unmasked) or client-side (masked) frames.
private func frames(_ bytes: [UInt8]) -> [(WebSocketFrame.Header, [UInt8])] {
    var out: [(WebSocketFrame.Header, [UInt8])] = []
    var at = 0
    while at < bytes.count {
        guard case .header(let h, let size) = bytes[at...].withUnsafeBytes({ WebSocketFrame.parse($0) }) else {
            XCTFail("undecodable frame at \(at)")
            return out
        }
        guard at + size + Int(h.length) <= bytes.count else {
            XCTFail("frame at \(at) runs past the end")
            return out
        }
        var payload = Array(bytes[(at + size)..<(at + size + Int(h.length))])
        if let mask = h.mask { payload.withUnsafeMutableBytes { WebSocketFrame.applyMask(mask, to: $0.baseAddress!, count: $0.count) } }
        out.append((h, payload))
        at += size + Int(h.length)
    }
    return out
}

private func pattern(_ count: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 8) } }

/// Waits (5 s at most) until `fd` has bytes to read.
private func waitReadable(_ fd: Int32) -> Bool {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    return poll(&p, 1, 5000) == 1
}

/// The kernel's TCP state of `fd` (TCP_ESTABLISHED until this end sends FIN).
private func tcpState(_ fd: Int32) -> UInt8 {
    var info = tcp_info()
    var length = socklen_t(MemoryLayout<tcp_info>.size)
    _ = getsockopt(fd, Int32(IPPROTO_TCP), TCP_INFO, &info, &length)
    return info.tcpi_state
}

final class WebSocketFrameTests: XCTestCase {
    func testLengthsRoundTripInTheirShortestForm() {
        for (length, size) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (1 << 33, 10)] as [(UInt64, Int)] {
            for mask in [nil, UInt32(0xA1B2_C3D4)] {
                let header = WebSocketFrame.Header(fin: length % 2 == 0, opcode: .binary, mask: mask, length: length)
                let bytes = header.encoded
                XCTAssertEqual(bytes.count, size + (mask == nil ? 0 : 4))
                XCTAssertEqual(bytes.withUnsafeBytes { WebSocketFrame.parse($0) }, .header(header, size: bytes.count))
                XCTAssertEqual(bytes.dropLast().withUnsafeBytes { WebSocketFrame.parse(UnsafeRawBufferPointer(rebasing: $0[...])) }, .needMore)
            }
        }
    }

    func testHeadersNoEndpointMaySendAreProtocolErrors() {
        func parse(_ bytes: [UInt8]) -> WebSocketFrame.Parsed { bytes.withUnsafeBytes { WebSocketFrame.parse($0) } }
        XCTAssertEqual(parse([0x82 | 0x40, 0x00]), .invalid(.protocolError, "reserved bits set"))
        XCTAssertEqual(parse([0x83, 0x00]), .invalid(.protocolError, "unknown opcode 3"))
        XCTAssertEqual(parse([0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0]), .invalid(.protocolError, "frame length has its top bit set"))
        XCTAssertEqual(parse([0x09, 0x00]), .invalid(.protocolError, "fragmented control frame"))
        XCTAssertEqual(parse([0x89, 126, 0, 126]), .invalid(.protocolError, "control frame longer than 125 bytes"))
        XCTAssertEqual(WebSocketFrame.parseClose([0x03]), .invalid)
        XCTAssertEqual(WebSocketFrame.parseClose([0x03, 0xED]), .invalid, "1005 is never sent")
        XCTAssertEqual(WebSocketFrame.parseClose([0x03, 0xE8, 0x41]), .code(1000))
        XCTAssertEqual(WebSocketFrame.parseClose([]), .code(nil))
    }

    func testMaskingMatchesTheRFCExampleAndCarriesItsPhaseAcrossPieces() {
        // RFC 6455 section 5.7: "Hello" masked with 37 fa 21 3d.
        var hello = Array("Hello".utf8)
        hello.withUnsafeMutableBytes { WebSocketFrame.applyMask(0x37FA_213D, to: $0.baseAddress!, count: 5) }
        XCTAssertEqual(hello, [0x7F, 0x9F, 0x4D, 0x51, 0x58])

        let plain = pattern(1000)
        var whole = plain
        whole.withUnsafeMutableBytes { WebSocketFrame.applyMask(0xDEAD_BEEF, to: $0.baseAddress!, count: 1000) }
        var pieces = plain
        pieces.withUnsafeMutableBytes { p in
            var at = 0
            for size in [3, 1, 17, 500, 479] {
                WebSocketFrame.applyMask(0xDEAD_BEEF, to: p.baseAddress! + at, count: size, phase: at & 3)
                at += size
            }
        }
        XCTAssertEqual(pieces, whole)
    }
}

final class WebSocketHandshakeTests: XCTestCase {
    private func request(_ lines: [String], target: String = "/ws", method: String = "GET") -> HTTPHead? {
        let text = "\(method) \(target) HTTP/1.1\r\n" + lines.map { $0 + "\r\n" }.joined() + "\r\n"
        let bytes = Array(text.utf8)
        return HTTPHead.parse(bytes[..<HTTPHead.end(in: bytes)!])
    }

    private let good = ["Host: example.com", "Upgrade: websocket", "Connection: keep-alive, Upgrade",
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]

    private func status(_ answer: WebSocketHandshake.Answer) -> Int {
        switch answer {
        case .upgrade: return 101
        case .refuse(let status, _, _): return status
        }
    }

    func testAcceptValueMatchesTheRFCExample() {
        XCTAssertEqual(WebSocketHandshake.acceptValue(forKey: "dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    }

    func testServerUpgradesAValidRequestAndRefusesTheRestWithTheRightStatus() {
        guard case .upgrade(let response) = WebSocketHandshake.answer(request(good, target: "/ws?x=1"), path: "/ws") else {
            return XCTFail("a valid request is upgraded")
        }
        XCTAssertTrue(String(decoding: response, as: UTF8.self).contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"))
        XCTAssertEqual(status(WebSocketHandshake.answer(request(good, target: "/other"), path: "/ws")), 404)
        XCTAssertEqual(status(WebSocketHandshake.answer(request(good.filter { !$0.hasPrefix("Upgrade") }), path: "/ws")), 426)
        XCTAssertEqual(status(WebSocketHandshake.answer(request(good.filter { !$0.hasPrefix("Sec-WebSocket-Version") } + ["Sec-WebSocket-Version: 8"]), path: "/ws")), 426)
        XCTAssertEqual(status(WebSocketHandshake.answer(request(good.filter { !$0.hasPrefix("Sec-WebSocket-Key") } + ["Sec-WebSocket-Key: c2hvcnQ="]), path: "/ws")), 400)
        XCTAssertEqual(status(WebSocketHandshake.answer(request(good, method: "POST"), path: "/ws")), 400)
        XCTAssertEqual(status(WebSocketHandshake.answer(nil, path: "/ws")), 400)
        guard case .refuse(_, _, let body) = WebSocketHandshake.answer(request(good, target: "/nope"), path: "/ws") else { return XCTFail() }
        XCTAssertTrue(String(decoding: body, as: UTF8.self).hasPrefix("HTTP/1.1 404 Not Found\r\n"))
    }

    func testClientExplainsAnAnswerWithout101() {
        func head(_ text: String) -> HTTPHead? {
            let bytes = Array(text.utf8)
            return HTTPHead.parse(bytes[..<HTTPHead.end(in: bytes)!])
        }
        let key = "dGhlIHNhbXBsZSBub25jZQ=="
        XCTAssertNoThrow(try WebSocketHandshake.check(response: head("HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"), key: key))
        for (answer, cause) in [("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "did not pass the WebSocket upgrade; it needs HTTP/1.1 and the Upgrade/Connection headers"),
                                ("HTTP/1.1 400 Bad Request\r\n\r\n", "did not pass the WebSocket upgrade"),
                                ("HTTP/1.1 404 Not Found\r\n\r\n", "--ws-path"),
                                ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n", "wrong Sec-WebSocket-Accept")] {
            XCTAssertThrowsError(try WebSocketHandshake.check(response: head(answer), key: key)) {
                XCTAssertTrue("\($0)".contains(cause), "\($0)")
            }
        }
    }
}

final class WebSocketStreamTests: XCTestCase {
    func testWritesReportExactlyWhatTheyConsumedUnderPartialWrites() {
        let wire = MemoryDuplex()
        wire.writeLimit = 1000
        let client = WebSocketStream(wrapping: wire, role: .client)
        let data = pattern(300_000)
        var offset = 0
        var calls = 0
        while offset < data.count {
            // The inner stream takes 1000 bytes a call, then says would-block every other call.
            wire.blocked = calls % 3 == 2
            calls += 1
            let offered = data.count - offset
            let r = data[offset...].withUnsafeBytes { client.write(from: $0.baseAddress!, count: offered) }
            switch r {
            case .bytes(let n):
                XCTAssertGreaterThan(n, 0)
                XCTAssertLessThanOrEqual(n, offered, "never more than was offered")
                offset += n
            case .wouldBlock:
                continue
            default:
                return XCTFail("write failed: \(r)")
            }
        }
        XCTAssertEqual(offset, data.count)
        let sent = frames(wire.written)
        XCTAssertTrue(sent.allSatisfy { $0.0.mask != nil && $0.0.opcode == .binary && $0.0.fin }, "a client masks every frame")
        XCTAssertEqual(sent.flatMap(\.1), data)
    }

    func testServerReadsMaskedFragmentsAndAnswersAPingBetweenThem() {
        let wire = MemoryDuplex()
        wire.incoming = WebSocketFrame.encode(.binary, payload: Array("abc".utf8), mask: 0x0102_0304, fin: false)
            + WebSocketFrame.encode(.ping, payload: [7, 8], mask: 0x1111_1111)
            + WebSocketFrame.encode(.continuation, payload: Array("def".utf8), mask: 0xFFFF_0000, fin: true)
        let server = WebSocketStream(wrapping: wire, role: .server, leftover: WebSocketFrame.encode(.binary, payload: [0x21], mask: 9))
        let (got, end) = drain(server)
        XCTAssertEqual(got, Array("!abcdef".utf8), "the upgrade's leftover bytes come first")
        XCTAssertEqual(end, .wouldBlock)
        let sent = frames(wire.written)
        XCTAssertEqual(sent.map(\.0.opcode), [.pong])
        XCTAssertEqual(sent.first?.1, [7, 8])
        XCTAssertNil(sent.first?.0.mask, "a server never masks")
    }

    private func rejected(_ incoming: [UInt8], role: WebSocketStream.Role = .server, maxMessage: Int = 1 << 20) -> (UInt16?, MemoryDuplex) {
        let wire = MemoryDuplex()
        wire.incoming = incoming
        let stream = WebSocketStream(wrapping: wire, role: role, settings: .init(maxMessage: maxMessage, pingInterval: nil))
        guard case .failed(let e) = drain(stream).1 else {
            XCTFail("the stream fails")
            return (nil, wire)
        }
        XCTAssertEqual(e.errno, EPROTO)
        stream.close(reset: true)
        let close = frames(wire.written).last
        XCTAssertEqual(close?.0.opcode, .close)
        return (close.flatMap { UInt16($0.1[0]) << 8 | UInt16($0.1[1]) }, wire)
    }

    func testViolationsCloseWithTheirCodeAndEndWithFinNotReset() {
        let (unmasked, wire) = rejected(WebSocketFrame.encode(.binary, payload: [1, 2, 3]))
        XCTAssertEqual(unmasked, 1002)
        XCTAssertEqual(wire.closedWithReset, false, "the close frame must reach the peer")
        XCTAssertEqual(rejected(WebSocketFrame.encode(.binary, payload: [1], mask: 5), role: .client).0, 1002)
        XCTAssertEqual(rejected(WebSocketFrame.encode(.text, payload: [0x41], mask: 5)).0, 1003)
        XCTAssertEqual(rejected(WebSocketFrame.encode(.continuation, payload: [0x41], mask: 5)).0, 1002)
        XCTAssertEqual(rejected(WebSocketFrame.encode(.binary, payload: pattern(600), mask: 5, fin: false)
                                + WebSocketFrame.encode(.continuation, payload: pattern(600), mask: 6), maxMessage: 1000).0, 1009)
        XCTAssertEqual(rejected([0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]).0, 1002, "a 2^63 length")
    }

    func testCloseFramesMapToHalfClose() {
        let wire = MemoryDuplex()
        wire.incoming = WebSocketFrame.encode(.binary, payload: [1, 2], mask: 3)
            + WebSocketFrame.encode(.close, payload: WebSocketFrame.closePayload(.normal), mask: 4)
        let server = WebSocketStream(wrapping: wire, role: .server)
        let (got, end) = drain(server)
        XCTAssertEqual(got, [1, 2])
        XCTAssertEqual(end, .eof, "the peer's close is EOF to the reader")
        XCTAssertEqual(server.peerCloseCode, 1000)
        XCTAssertTrue(wire.written.isEmpty, "our side may still write after the peer's close")
        XCTAssertEqual([9, 9].withUnsafeBytes { server.write(from: $0.baseAddress!, count: 2) }, .bytes(2))
        XCTAssertNil(server.shutdownWrite())
        XCTAssertEqual(frames(wire.written).map(\.0.opcode), [.binary, .close])
        XCTAssertEqual([9].withUnsafeBytes { server.write(from: $0.baseAddress!, count: 1) }, .failed(SystemError("websocket: write after close", errno: EPIPE)))
    }

    /// The tunnel's dedicated data channel over ws: the server's close frame arrives
    /// after the client's last read (TLS above took its close_notify as EOF). Closing
    /// with it unread sent RST, and the server's relay, seeing the error, dropped the
    /// echo it had received and not yet read: the visitor got a reset and no bytes.
    func testClosingReadsThePeersLateCloseFrameSoThePeerGetsFinNotReset() throws {
        let (peer, fd) = try tcpPair()
        defer { close(peer) }
        let client = WebSocketStream(wrapping: TCPStream(fd: fd), role: .client, settings: .init(pingInterval: nil))
        sendAll(peer, WebSocketFrame.encode(.binary, payload: [1, 2, 3]))
        XCTAssertTrue(waitReadable(fd))
        var buffer = [UInt8](repeating: 0, count: 16)
        XCTAssertEqual(buffer.withUnsafeMutableBytes { client.read(into: $0.baseAddress!, count: $0.count) }, .bytes(3))
        sendAll(peer, WebSocketFrame.encode(.close, payload: WebSocketFrame.closePayload(.normal)))
        XCTAssertTrue(waitReadable(fd))
        client.close(reset: false)
        let (bytes, error) = readToEnd(peer)
        XCTAssertEqual(error, 0, "the peer sees FIN, not a reset (errno \(error))")
        XCTAssertEqual(frames(bytes).map(\.0.opcode), [.close])
    }

    /// The inner TLS of the tunnel half-closes with close_notify and the WebSocket's
    /// close frame, never a FIN on the socket: nginx in front of the server ends an
    /// upgraded connection at the first FIN from either side, so the answer to a
    /// visitor that half-closed (an echo) never came back.
    func testTLSInsideAWebSocketHalfClosesWithACloseFrameNotAFin() throws {
        let (peer, fd) = try tcpPair()
        defer { close(peer) }
        let ws = WebSocketStream(wrapping: TCPStream(fd: fd), role: .client, settings: .init(pingInterval: nil))
        let tls = try TLSStream(over: ws, context: TLSContext.psk(key: [UInt8](repeating: 7, count: 32), server: false))
        XCTAssertNil(tls.shutdownWrite())
        XCTAssertEqual(tcpState(fd), UInt8(TCP_ESTABLISHED), "no FIN under the WebSocket")
        XCTAssertTrue(waitReadable(peer))
        var buffer = [UInt8](repeating: 0, count: 256)
        let n = recv(peer, &buffer, buffer.count, Int32(MSG_DONTWAIT))
        XCTAssertGreaterThan(n, 0)
        XCTAssertEqual(frames(Array(buffer[0..<max(n, 0)])).map(\.0.opcode), [.close])
        tls.close(reset: false)
    }

    /// A pong answering a ping read while a data frame is held waits in the queue too:
    /// the owner must see it as output still to send.
    func testBufferedOutputCountsControlFramesQueuedBehindAHeldFrame() {
        let wire = MemoryDuplex()
        wire.blocked = true
        let server = WebSocketStream(wrapping: wire, role: .server, settings: .init(pingInterval: nil))
        XCTAssertEqual(pattern(1000).withUnsafeBytes { server.write(from: $0.baseAddress!, count: 1000) }, .wouldBlock)
        XCTAssertEqual(server.bufferedOutput, 0, "the held frame is not reported written")
        wire.incoming = WebSocketFrame.encode(.ping, payload: [7, 8], mask: 0x0102_0304)
        XCTAssertEqual(drain(server).1, .wouldBlock)
        XCTAssertEqual(server.bufferedOutput, 4, "the pong waits behind the held frame")
        wire.blocked = false
        XCTAssertEqual(pattern(1000).withUnsafeBytes { server.write(from: $0.baseAddress!, count: 1000) }, .bytes(1000))
        XCTAssertEqual(server.bufferedOutput, 0)
        XCTAssertEqual(frames(wire.written).map(\.0.opcode), [.binary, .pong])
    }

    /// Large payloads leave as one frame per write, masked by a client and unmasked by
    /// a server, and read back whole across frame and buffer boundaries.
    func testLargeWritesRoundTripBothWays() throws {
        for role in [WebSocketStream.Role.client, .server] {
            let wire = MemoryDuplex()
            let sender = WebSocketStream(wrapping: wire, role: role, settings: .init(pingInterval: nil))
            let data = pattern(700_001)
            var offset = 0
            while offset < data.count {
                let offered = data.count - offset
                guard case .bytes(let n) = data[offset...].withUnsafeBytes({ sender.write(from: $0.baseAddress!, count: offered) }) else {
                    return XCTFail("write failed")
                }
                offset += n
            }
            let sent = frames(wire.written)
            XCTAssertEqual(sent.count, 3, "frames as long as the writes allow")
            XCTAssertTrue(sent.allSatisfy { ($0.0.mask != nil) == (role == .client) })
            let back = MemoryDuplex()
            back.incoming = wire.written
            let receiver = WebSocketStream(wrapping: back, role: role == .client ? .server : .client, settings: .init(pingInterval: nil))
            XCTAssertEqual(drain(receiver).0, data)
        }
    }

    /// A reader held back by a slow destination leaves frames unread: the pong to our
    /// ping waits among them. The keepalive must not end the connection for that, and
    /// the peer, whose pings we cannot see, gets unsolicited pongs instead.
    func testKeepaliveSurvivesAReaderThatStoppedReading() throws {
        let (peer, fd) = try tcpPair()
        defer { close(peer) }
        let runner = try LoopThread()
        defer { runner.stop() }
        let timedOut = Mutex(false)
        let client = WebSocketStream(wrapping: TCPStream(fd: fd), role: .client, settings: .init(pingInterval: nil))
        sendAll(peer, WebSocketFrame.encode(.binary, payload: pattern(10_000)))
        XCTAssertTrue(waitReadable(fd))
        runner.sync {
            client.startKeepalive(on: runner.loop, interval: .milliseconds(50)) { timedOut.withLock { $0 = true } }
        }
        var got: [UInt8] = []
        let deadline = Date().addingTimeInterval(5)
        while frames(got).filter({ $0.0.opcode == .pong }).count < 3 && Date() < deadline {
            var buffer = [UInt8](repeating: 0, count: 256)
            var p = pollfd(fd: peer, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 100) == 1 {
                let n = recv(peer, &buffer, buffer.count, 0)
                if n > 0 { got += buffer[0..<n] }
            }
        }
        XCTAssertEqual(frames(got).filter { $0.0.opcode == .pong }.count, 3, "a heartbeat pong each tick")
        XCTAssertFalse(timedOut.withLock { $0 }, "no timeout while received frames wait unread")
        runner.sync { client.close(reset: true) }
    }

    /// A graceful close that finds the socket full keeps the stream until its frames and
    /// the close frame are out, on the loop's timer.
    func testGracefulCloseFlushesWhatTheFullSocketHasNotTakenYet() throws {
        let (peer, fd) = try tcpPair()
        defer { close(peer) }
        var small: Int32 = 4096
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        let runner = try LoopThread()
        defer { runner.stop() }
        let server = WebSocketStream(wrapping: TCPStream(fd: fd), role: .server, settings: .init(pingInterval: nil))
        let data = pattern(200_000)
        runner.sync {
            server.startLayerKeepalive(on: runner.loop)
            while case .bytes = data.withUnsafeBytes({ server.write(from: $0.baseAddress!, count: data.count) }) {}
            server.close(reset: false)
        }
        let (bytes, error) = readToEnd(peer)
        XCTAssertEqual(error, 0)
        XCTAssertEqual(Array(bytes.suffix(4)), [0x88, 0x02, 0x03, 0xE8], "the close frame (1000) reached the peer, after the held frame")
        let received = frames(bytes)
        XCTAssertGreaterThan(received.count, 1)
        XCTAssertTrue(received.dropLast().allSatisfy { $0.0.opcode == .binary && $0.1 == data }, "whole frames, as written")
    }

    /// A multiplexer's frame handed over whole (`writeThrough`) is one data frame of its
    /// header and body, reported taken at once; what the socket did not take waits as
    /// buffered output until `flushBuffered`.
    func testWriteThroughSendsTheLayersHeaderAndBodyAsOneFrame() throws {
        for role in [WebSocketStream.Role.client, .server] {
            let (peer, fd) = try tcpPair()
            defer { close(peer) }
            var small: Int32 = 4096
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &small, socklen_t(MemoryLayout<Int32>.size))
            let stream = WebSocketStream(wrapping: TCPStream(fd: fd), role: role, settings: .init(pingInterval: nil))
            let layerHeader: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8, 9]
            let body = pattern(300_000)
            let r = layerHeader.withUnsafeBytes { h in
                body.withUnsafeBytes { b in stream.writeThrough(header: h.baseAddress!, 9, body: b.baseAddress!, b.count) }
            }
            XCTAssertEqual(r, .bytes(300_009))
            XCTAssertGreaterThan(stream.bufferedOutput, 0, "the socket took only part of it")
            let expected = 300_009 + (role == .client ? 14 : 10)
            var got: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            let deadline = Date().addingTimeInterval(10)
            while got.count < expected && Date() < deadline {
                _ = stream.flushBuffered()
                let n = recv(peer, &buffer, buffer.count, Int32(MSG_DONTWAIT))
                if n > 0 {
                    got += buffer[0..<n]
                } else {
                    // Room in our send buffer or bytes for the peer, whichever comes first.
                    var fds = [pollfd(fd: peer, events: Int16(POLLIN), revents: 0), pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)]
                    _ = poll(&fds, 2, 100)
                }
            }
            XCTAssertEqual(stream.bufferedOutput, 0)
            let sent = frames(got)
            XCTAssertEqual(sent.count, 1)
            XCTAssertEqual(sent.first?.1, layerHeader + body)
            XCTAssertEqual(sent.first?.0.mask != nil, role == .client)
            stream.close(reset: true)
        }
    }
}
