import Foundation
import Glibc
import Synchronization
import XCTest
@testable import Reactor
@testable import Transfer

// Two MuxConnections over one loopback TCP connection, driven on a real loop; or one
// MuxConnection facing a raw socket the test writes frames to (docs/PROTOCOL.md,
// "Multiplexed data channels"). Everything a stream does happens on the loop thread,
// through `LoopThread.sync`.

private func setNonBlocking(_ fd: Int32) {
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
}

/// Bounds blocking reads and writes of a test-side socket, so a missing close fails
/// the test instead of hanging it.
private func setTimeouts(_ fd: Int32, seconds: Int) {
    var tv = timeval(tv_sec: seconds, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
}

/// Polls `condition` until it holds or the deadline passes; false (and a failure) then.
@discardableResult
private func eventually(_ what: String, timeout: TimeInterval = 5, file: StaticString = #filePath, line: UInt = #line,
                        _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while !condition() {
        if Date() > deadline {
            XCTFail("timed out after \(timeout)s waiting for \(what)", file: file, line: line)
            return false
        }
        usleep(1000)
    }
    return true
}

/// A mux frame as it goes on the wire: u8 type, u32 BE stream id, u32 BE length, payload.
private func frame(_ type: UInt8, _ id: UInt32, length: UInt32? = nil, _ payload: [UInt8] = []) -> [UInt8] {
    var out = [type]
    withUnsafeBytes(of: id.bigEndian) { out += $0 }
    withUnsafeBytes(of: (length ?? UInt32(payload.count)).bigEndian) { out += $0 }
    return out + payload
}

private func u32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

/// Records the wake-ups a stream gives whoever attached to it.
private final class StreamProbe: EventHandler {
    private(set) var seen: UInt32 = 0
    func handleEvents(_ events: UInt32, tag: UInt8) { seen |= events }
}

/// Loop-side stream I/O for the tests. Loop thread only.
private enum StreamIO {
    /// Everything `stream` has now (up to `limit`), and what the last read said.
    static func drain(_ stream: MuxStream, limit: Int = .max) -> (bytes: [UInt8], end: IOResult) {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while out.count < limit {
            let want = min(buf.count, limit - out.count)
            let r = buf.withUnsafeMutableBytes { stream.read(into: $0.baseAddress!, count: want) }
            guard case .bytes(let n) = r else { return (out, r) }
            out += buf[0..<n]
        }
        return (out, .bytes(0))
    }

    /// Writes from `bytes[offset...]` until the stream pushes back; the new offset and
    /// the result that stopped it.
    static func push(_ stream: MuxStream, _ bytes: [UInt8], from offset: Int) -> (offset: Int, end: IOResult) {
        var off = offset
        while off < bytes.count {
            let r = bytes[off...].withUnsafeBytes { stream.write(from: $0.baseAddress!, count: $0.count) }
            guard case .bytes(let n) = r else { return (off, r) }
            off += n
        }
        return (off, .bytes(0))
    }
}

/// Drives a TLS handshake on a non-blocking socket to its end (10 s at most).
private func handshake(_ stream: TLSStream) throws {
    let deadline = Date().addingTimeInterval(10)
    while Date() < deadline {
        let step = try stream.handshakeStep()
        if step == .done { return }
        var p = pollfd(fd: stream.fd, events: Int16(step == .wantRead ? POLLIN : POLLOUT), revents: 0)
        _ = poll(&p, 1, 100)
    }
    throw SystemError("TLS handshake", errno: ETIMEDOUT)
}

/// TLS 1.3 with a pre-shared key over a connected socket pair, handshaken here (the
/// client on another thread), non-blocking, waiting with poll.
private func tlsPair(_ x: Int32, _ y: Int32) throws -> (Duplex, Duplex) {
    let key = [UInt8](repeating: 0x42, count: 32)
    setNonBlocking(x)
    setNonBlocking(y)
    let client = try TLSStream(fd: x, context: TLSContext.psk(key: key, server: false))
    let server = try TLSStream(fd: y, context: TLSContext.psk(key: key, server: true))
    let clientDone = DispatchSemaphore(value: 0)
    let clientError = Box<Error>()
    Thread {
        do { try handshake(client) } catch { clientError.value = error }
        clientDone.signal()
    }.start()
    try handshake(server)
    XCTAssertEqual(clientDone.wait(timeout: .now() + 10), .success, "TLS handshake")
    if let e = clientError.value { throw e }
    return (client, server)
}

/// An opener and an acceptor over one loopback TCP connection, on a loop thread.
private final class MuxPair {
    let runner: LoopThread
    let opener: MuxConnection
    let acceptor: MuxConnection
    /// Streams handed to the acceptor's `onOpen`, with their open payloads. Loop thread only.
    var accepted: [(stream: MuxStream, payload: [UInt8])] = []
    /// What each side's onClose reported (nil inside: closed by `close()`). Loop thread only.
    var closes: [String: Error?] = [:]

    /// - Parameters:
    ///   - pipes: lets both ends splice bulk payload (as the tunnel does on a plain
    ///     carrier); nil: every byte goes through memory.
    ///   - tls: the carrier is TLS (PSK), handshaken before the loop takes over.
    init(pipes: PipePool? = nil, tls: Bool = false) throws {
        let (x, y) = try tcpPair()
        let carriers: (Duplex, Duplex) = tls ? try tlsPair(x, y) : (TCPStream(fd: x), TCPStream(fd: y))
        setNonBlocking(x)
        setNonBlocking(y)
        runner = try LoopThread()
        let loop = runner.loop
        (opener, acceptor) = runner.sync {
            (MuxConnection(loop: loop, carrier: carriers.0, isOpener: true, pipes: pipes),
             MuxConnection(loop: loop, carrier: carriers.1, isOpener: false, pipes: pipes))
        }
        runner.sync { [self] in
            acceptor.onOpen = { [unowned self] stream, payload in accepted.append((stream, Array(payload))) }
            opener.onClose = { [unowned self] _, error in closes["opener"] = .some(error) }
            acceptor.onClose = { [unowned self] _, error in closes["acceptor"] = .some(error) }
            try! opener.start()
            try! acceptor.start()
        }
    }

    func sync<T>(_ body: @escaping () -> T) -> T { runner.sync(body) }

    /// Opens a stream and waits for the acceptor to get it: (opener's end, acceptor's end).
    func openStream(_ payload: [UInt8] = [7]) -> (MuxStream, MuxStream)? {
        let before = sync { self.accepted.count }
        guard let a = sync({ self.opener.open(payload) }) else {
            XCTFail("opener refused to open a stream")
            return nil
        }
        guard eventually("the acceptor's onOpen", { self.sync { self.accepted.count } > before }) else { return nil }
        let (b, got) = sync { self.accepted[before] }
        XCTAssertEqual(got, payload, "the open frame's payload reaches onOpen")
        XCTAssertEqual(a.id, b.id)
        return (a, b)
    }

    /// Sends `bytes` from `w` to `r` (then half-closes `w` when `shutdown`), reading at `r`
    /// as they arrive, until `r` reads EOF or an error, or everything arrived without
    /// `shutdown`. The loop runs freely between steps, so window credit flows.
    func transfer(_ bytes: [UInt8], from w: MuxStream, to r: MuxStream, shutdown: Bool,
                  timeout: TimeInterval = 10) -> (received: [UInt8], end: IOResult) {
        var offset = 0
        var received: [UInt8] = []
        var shut = false
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let (o, got, end) = sync { () -> (Int, [UInt8], IOResult) in
                let (o, _) = StreamIO.push(w, bytes, from: offset)
                if o == bytes.count && shutdown && !shut { XCTAssertNil(w.shutdownWrite()) }
                let (got, end) = StreamIO.drain(r)
                return (o, got, end)
            }
            if o == bytes.count && shutdown { shut = true }
            offset = o
            received += got
            switch end {
            case .eof, .failed: return (received, end)
            default: break
            }
            if !shutdown && received.count >= bytes.count { return (received, .bytes(0)) }
            if got.isEmpty { usleep(500) }
        }
        XCTFail("transfer of \(bytes.count) bytes timed out after \(received.count) arrived")
        return (received, .wouldBlock)
    }

    func shutdown() {
        sync {
            self.opener.close()
            self.acceptor.close()
            self.accepted.removeAll()
        }
        XCTAssertEqual(sync { self.runner.loop.registrationCount }, 0, "closed carriers leave the loop")
        runner.stop()
    }
}

/// One MuxConnection whose carrier's other end is a blocking socket of the test: the
/// test writes frames by hand, as a misbehaving peer would.
private final class RawPeer {
    let runner: LoopThread
    let mux: MuxConnection
    /// The test's end of the carrier (blocking, with timeouts).
    let socket: Int32
    var accepted: [MuxStream] = []
    let closed = DispatchSemaphore(value: 0)
    /// What onClose reported (outer nil: not called yet). Loop thread only until `closed`.
    var closeError: Error?? = nil

    init(isOpener: Bool) throws {
        let (outer, inner) = try tcpPair()
        setTimeouts(outer, seconds: 5)
        socket = outer
        runner = try LoopThread()
        let loop = runner.loop
        mux = runner.sync { MuxConnection(loop: loop, carrier: TCPStream(fd: inner), isOpener: isOpener) }
        runner.sync { [self] in
            mux.onOpen = { [unowned self] stream, _ in accepted.append(stream) }
            mux.onClose = { [unowned self] _, error in
                closeError = .some(error)
                closed.signal()
            }
            try! mux.start()
        }
    }

    func send(_ bytes: [UInt8]) { sendAll(socket, bytes) }

    /// Sends an `open` for `id` and waits for the stream to reach onOpen.
    func acceptStream(_ id: UInt32) -> MuxStream? {
        send(frame(MuxConnection.FrameType.open.rawValue, id, [0, 0, 0, 1]))
        guard eventually("onOpen for stream \(id)", { runner.sync { self.accepted.count } > 0 }) else { return nil }
        return runner.sync { self.accepted.last }
    }

    func shutdown() {
        runner.sync { self.mux.close() }
        runner.stop()
        close(socket)
    }
}

final class MuxTests: XCTestCase {
    // MARK: many streams, both ways

    func testFiftyStreamsCarryDistinctPayloadsBothWaysThroughRelays() throws {
        try fiftyStreamsThroughRelays(spliced: false)
    }

    /// Over TLS: data frames are encrypted straight from the relays' buffers
    /// (`writeThrough`) while small frames queue, and both keep their order.
    func testFiftyStreamsCarryDistinctPayloadsBothWaysOverTLS() throws {
        try fiftyStreamsThroughRelays(spliced: false, tls: true)
    }

    /// The same with pipes: bulk payload is spliced carrier -> pipe -> socket at the
    /// receiving end and pipe -> carrier at the sending end. The pipes are small, so
    /// some fill up and the rest of a frame falls back to memory, in order.
    func testFiftyStreamsCarryDistinctPayloadsBothWaysThroughSplicingRelays() throws {
        try fiftyStreamsThroughRelays(spliced: true)
    }

    private func fiftyStreamsThroughRelays(spliced: Bool, tls: Bool = false) throws {
        let count = 50
        let window = MuxConnection.initialWindow
        let block = randomBytes(window + (2 << 20), seed: 42)
        // Sizes from empty to a few hundred KiB, and every tenth stream above the window,
        // so credit has to flow back on some while the others share the carrier.
        func slice(_ i: Int, _ salt: Int) -> [UInt8] {
            let size = i % 10 == 7 ? window + 1 + (i * 7_919 + salt) % 65_536 : (i * 97_231 + salt) % 700_000
            let start = (i * 40_961 + salt) % (block.count - size)
            return Array(block[start..<start + size])
        }
        let up = (0..<count).map { slice($0, 0) }
        let down = (0..<count).map { slice($0, 12_345) }
        XCTAssertTrue(up.contains { $0.isEmpty } && up.contains { $0.count > window } && down.contains { $0.count > window })

        let resources = LoopResources(pipes: PipePool(pipeSize: 65536), buffers: BufferPool(bufferSize: 16384))
        let pair = try MuxPair(pipes: spliced ? resources.pipes : nil, tls: tls)
        defer { pair.shutdown() }
        // Test-side ends: visitors (x) at the opener, local services (y) at the acceptor.
        var x: [Int32] = [], a: [Int32] = [], y: [Int32] = [], b: [Int32] = []
        for _ in 0..<count {
            let (xi, ai) = try tcpPair()
            let (yi, bi) = try tcpPair()
            x.append(xi); a.append(ai); y.append(yi); b.append(bi)
        }
        let relays = Box<[CopyBidirectional]>()
        let reasons = Mutex<[String: CloseReason]>([:])
        let allClosed = expectation(description: "every relay closed")
        allClosed.expectedFulfillmentCount = 2 * count
        pair.sync {
            relays.value = []
            func relay(_ side: String, _ i: Int, _ p: Duplex, _ q: Duplex) {
                let r = CopyBidirectional(loop: pair.runner.loop, resources: resources, a: p, b: q) { _, reason in
                    reasons.withLock { $0["\(side)\(i)"] = reason }
                    allClosed.fulfill()
                }
                relays.value!.append(r)
                try! r.start()
            }
            // The acceptor learns which local end a stream belongs to from its open payload.
            pair.acceptor.onOpen = { stream, payload in
                let i = Int(UInt32(bigEndian: payload.loadUnaligned(as: UInt32.self)))
                relay("acceptor", i, stream, TCPStream(fd: b[i]))
            }
            for i in 0..<count {
                relay("opener", i, TCPStream(fd: a[i]), pair.opener.open(u32(UInt32(i)))!)
            }
        }
        let results = exchange(x.enumerated().map { ($1, up[$0]) } + y.enumerated().map { ($1, down[$0]) }, timeout: 30)
        for fd in x + y { close(fd) }
        wait(for: [allClosed], timeout: 10)

        for i in 0..<count {
            let atX = results[i], atY = results[count + i]
            XCTAssertEqual(atY.error, 0, "stream \(i): local end read cleanly")
            XCTAssertEqual(atX.error, 0, "stream \(i): visitor end read cleanly")
            XCTAssertTrue(atY.bytes == up[i], "stream \(i): \(atY.bytes.count) of \(up[i].count) bytes up, intact: \(atY.bytes == up[i])")
            XCTAssertTrue(atX.bytes == down[i], "stream \(i): \(atX.bytes.count) of \(down[i].count) bytes down, intact: \(atX.bytes == down[i])")
        }
        let final = reasons.withLock { $0 }
        XCTAssertEqual(final.count, 2 * count)
        XCTAssertTrue(final.values.allSatisfy { $0 == .eof }, "every relay ended with EOF both ways: \(final.filter { $0.value != .eof })")
        pair.sync { relays.value = nil }
        // Streams that ended cleanly leave no state; the carrier is still up.
        XCTAssertEqual(pair.sync { pair.opener.streamCount }, 0)
        XCTAssertEqual(pair.sync { pair.acceptor.streamCount }, 0)
        XCTAssertFalse(pair.sync { pair.opener.isClosed || pair.acceptor.isClosed })
        XCTAssertEqual(pair.sync { resources.buffers.outstanding }, 0)
        XCTAssertEqual(pair.sync { resources.pipes.outstanding }, 0, "every pipe went back to the pool or was closed")
        if spliced {
            XCTAssertGreaterThan(pair.sync { resources.pipes.created }, 0, "bulk streams spliced")
        }
    }

    /// Sends each end's bytes, half-closes it, and reads it to EOF, all ends at once from
    /// one thread (poll); what each end received and the errno its reading ended with.
    private func exchange(_ ends: [(fd: Int32, send: [UInt8])], timeout: TimeInterval) -> [(bytes: [UInt8], error: Int32)] {
        var sent = [Int](repeating: 0, count: ends.count)
        var shut = [Bool](repeating: false, count: ends.count)
        var done = [Bool](repeating: false, count: ends.count)
        var results = [(bytes: [UInt8], error: Int32)](repeating: ([], 0), count: ends.count)
        var buf = [UInt8](repeating: 0, count: 65536)
        for e in ends { setNonBlocking(e.fd) }
        let deadline = Date().addingTimeInterval(timeout)
        while done.contains(false) {
            if Date() > deadline {
                XCTFail("exchange timed out: \(done.filter { !$0 }.count) ends not at EOF")
                break
            }
            var fds = ends.enumerated().map { i, e in
                pollfd(fd: e.fd, events: Int16(done[i] ? 0 : POLLIN) | Int16(shut[i] ? 0 : POLLOUT), revents: 0)
            }
            _ = poll(&fds, nfds_t(fds.count), 100)
            for (i, e) in ends.enumerated() {
                if !shut[i] && fds[i].revents & Int16(POLLOUT | POLLERR | POLLHUP) != 0 {
                    while sent[i] < e.send.count {
                        let n = e.send[sent[i]...].withUnsafeBytes { write(e.fd, $0.baseAddress, min($0.count, 65536)) }
                        if n <= 0 { break }
                        sent[i] += n
                    }
                    if sent[i] == e.send.count {
                        shutdown(e.fd, Int32(SHUT_WR))
                        shut[i] = true
                    }
                }
                if !done[i] && fds[i].revents & Int16(POLLIN | POLLERR | POLLHUP) != 0 {
                    while true {
                        let n = read(e.fd, &buf, buf.count)
                        if n > 0 { results[i].bytes += buf[0..<n]; continue }
                        if n == 0 { done[i] = true } else if errno != EAGAIN { results[i].error = errno; done[i] = true }
                        break
                    }
                }
            }
        }
        return results
    }

    // MARK: half-close

    func testHalfClosedStreamDeliversEOFAndStillCarriesTheAnswer() throws {
        let pair = try MuxPair()
        defer { pair.shutdown() }
        let (a, b) = try XCTUnwrap(pair.openStream([1, 2, 3]))
        let probe = StreamProbe()
        pair.sync { _ = b.attachVirtual(probe, tag: 0) }

        let request = randomBytes(200_000, seed: 3)
        let up = pair.transfer(request, from: a, to: b, shutdown: true)
        XCTAssertEqual(up.end, .eof, "the acceptor reads EOF after the request")
        XCTAssertTrue(up.received == request, "request intact (\(up.received.count) of \(request.count) bytes)")
        XCTAssertNotEqual(pair.sync { probe.seen } & EventBits.readable, 0, "the attached reader was woken")
        XCTAssertEqual(pair.sync { a.write(from: [UInt8]([9]), count: 1) }, .failed(SystemError("mux stream", errno: EPIPE)),
                       "no writes after shutdownWrite")

        // The other direction is still open: an answer larger than the window arrives whole.
        let answer = randomBytes(3 * MuxConnection.initialWindow + 17, seed: 4)
        let down = pair.transfer(answer, from: b, to: a, shutdown: true)
        XCTAssertEqual(down.end, .eof)
        XCTAssertTrue(down.received == answer, "answer intact (\(down.received.count) of \(answer.count) bytes)")

        // Both sides sent EOF: closing is clean and forgets the stream on both ends.
        pair.sync {
            a.close(reset: false)
            b.close(reset: false)
        }
        eventually("both ends to forget the stream") {
            pair.sync { pair.opener.streamCount == 0 && pair.acceptor.streamCount == 0 }
        }
        XCTAssertFalse(pair.sync { pair.opener.isClosed || pair.acceptor.isClosed })
    }

    func testClosingAfterThePeersEOFSendsEOFNotReset() throws {
        let pair = try MuxPair()
        defer { pair.shutdown() }
        let (a, b) = try XCTUnwrap(pair.openStream())
        XCTAssertEqual(pair.transfer([1, 2, 3], from: a, to: b, shutdown: true).end, .eof)
        // The acceptor answers and closes without a shutdownWrite of its own.
        pair.sync {
            XCTAssertEqual(b.write(from: [UInt8]([4, 5]), count: 2), .bytes(2))
            b.close(reset: false)
        }
        var got: [UInt8] = []
        var end: IOResult = .wouldBlock
        eventually("the answer and EOF at the opener") {
            let (bytes, e) = pair.sync { StreamIO.drain(a) }
            got += bytes
            end = e
            return e != .wouldBlock
        }
        XCTAssertEqual(got, [4, 5])
        XCTAssertEqual(end, .eof, "a close after the peer's EOF is an orderly end, not a reset")
    }

    // MARK: reset

    func testResetMakesThePeersReadFailWithConnectionReset() throws {
        let pair = try MuxPair()
        defer { pair.shutdown() }
        let (a, b) = try XCTUnwrap(pair.openStream())
        let probe = StreamProbe()
        pair.sync { _ = b.attachVirtual(probe, tag: 1) }
        XCTAssertEqual(pair.transfer([1, 2, 3], from: a, to: b, shutdown: false).received, [1, 2, 3])

        pair.sync { a.close(reset: true) }
        XCTAssertEqual(pair.sync { pair.opener.streamCount }, 0, "the resetting side forgets the stream at once")
        var end: IOResult = .wouldBlock
        eventually("the reset to reach the acceptor") {
            end = pair.sync { StreamIO.drain(b).end }
            return end != .wouldBlock
        }
        XCTAssertEqual(end, .failed(SystemError("mux stream", errno: ECONNRESET)))
        XCTAssertNotEqual(pair.sync { probe.seen } & EventBits.error, 0, "the attached relay was woken with an error")
        XCTAssertEqual(pair.sync { b.write(from: [UInt8]([1]), count: 1) }, .failed(SystemError("mux stream", errno: ECONNRESET)))
        XCTAssertEqual(pair.sync { b.shutdownWrite()?.errno }, ECONNRESET)
        pair.sync { b.close(reset: false) }
        XCTAssertEqual(pair.sync { pair.acceptor.streamCount }, 0)

        // Only the stream ended: the carrier takes new streams.
        let (c, d) = try XCTUnwrap(pair.openStream([2]))
        XCTAssertNotEqual(c.id, a.id, "a fresh id for the new stream")
        XCTAssertEqual(pair.transfer([7, 8, 9], from: d, to: c, shutdown: true).received, [7, 8, 9])
        XCTAssertTrue(pair.sync { pair.closes.isEmpty }, "neither carrier closed")
    }

    func testClosingBeforeThePeersEOFResetsThePeer() throws {
        let pair = try MuxPair()
        defer { pair.shutdown() }
        let (a, b) = try XCTUnwrap(pair.openStream())
        pair.sync { b.close(reset: false) }
        var end: IOResult = .wouldBlock
        eventually("the close to reach the opener") {
            end = pair.sync { StreamIO.drain(a).end }
            return end != .wouldBlock
        }
        XCTAssertEqual(end, .failed(SystemError("mux stream", errno: ECONNRESET)),
                       "the peer could still send, so closing aborts the stream")
    }

    /// A reset outranks everything the stream was doing: the side that already sent its
    /// EOF sees it on writes too (not EPIPE), and unread bytes are dropped, as with a
    /// TCP reset.
    func testResetAfterHalfCloseFailsTheHalfClosedSide() throws {
        let pair = try MuxPair()
        defer { pair.shutdown() }
        let (a, b) = try XCTUnwrap(pair.openStream())
        XCTAssertEqual(pair.transfer([1, 2, 3], from: a, to: b, shutdown: true).end, .eof)
        XCTAssertEqual(pair.sync { a.state }, .halfClosed(.local))
        XCTAssertEqual(pair.sync { b.state }, .halfClosed(.remote))
        pair.sync { XCTAssertEqual(b.write(from: [UInt8]([4]), count: 1), .bytes(1)) }
        eventually("the answer to reach the opener") {
            pair.sync { if case .bytes = a.borrowReadable() { true } else { false } }
        }

        pair.sync { b.close(reset: true) }
        XCTAssertEqual(pair.sync { b.state }, .closed)
        eventually("the reset to reach the opener") { pair.sync { a.state == .reset } }
        let reset = SystemError("mux stream", errno: ECONNRESET)
        pair.sync {
            XCTAssertEqual(StreamIO.drain(a).end, .failed(reset), "the unread answer is dropped")
            XCTAssertEqual(a.write(from: [UInt8]([5]), count: 1), .failed(reset))
            XCTAssertEqual(a.shutdownWrite(), reset)
            XCTAssertEqual(a.pendingError(), ECONNRESET)
            a.close(reset: false)
            XCTAssertEqual(a.state, .closed)
        }
        XCTAssertEqual(pair.sync { pair.opener.streamCount + pair.acceptor.streamCount }, 0)
        XCTAssertTrue(pair.sync { pair.closes.isEmpty }, "only the stream ended")
    }

    // MARK: close when idle

    func testCloseWhenIdleWithoutStreamsClosesAtOnce() throws {
        let pair = try MuxPair()
        defer { pair.shutdown() }
        pair.sync { pair.opener.closeWhenIdle() }
        XCTAssertTrue(pair.sync { pair.opener.isClosed })
        let reported = pair.sync { pair.closes["opener"] }
        XCTAssertNil(try XCTUnwrap(reported, "onClose was called"), "an idle close is not an error")
    }

    /// The session that owned a carrier is gone: no new streams, the running ones go on
    /// both ways, and the carrier ends, with no error, once the last of them does.
    func testCloseWhenIdleEndsTheCarrierAfterItsLastStream() throws {
        let pair = try MuxPair()
        defer { pair.shutdown() }
        let (a1, b1) = try XCTUnwrap(pair.openStream([1]))
        let (a2, b2) = try XCTUnwrap(pair.openStream([2]))
        pair.sync { pair.opener.closeWhenIdle() }
        XCTAssertNil(pair.sync { pair.opener.open([3]) }, "no new streams on a draining carrier")

        XCTAssertEqual(pair.transfer([5, 6], from: a1, to: b1, shutdown: true).end, .eof)
        let answer = pair.transfer([7, 8], from: b1, to: a1, shutdown: true)
        XCTAssertEqual(answer.received, [7, 8])
        XCTAssertEqual(answer.end, .eof)
        pair.sync {
            a1.close(reset: false)
            b1.close(reset: false)
        }
        eventually("both ends to forget the first stream") {
            pair.sync { pair.opener.streamCount == 1 && pair.acceptor.streamCount == 1 }
        }
        XCTAssertEqual(pair.transfer([9], from: b2, to: a2, shutdown: false).received, [9])
        XCTAssertFalse(pair.sync { pair.opener.isClosed }, "a stream still runs")
        XCTAssertTrue(pair.sync { pair.closes.isEmpty })

        pair.sync { a2.close(reset: false) }
        eventually("the reset to reach the acceptor") { pair.sync { b2.state == .reset } }
        eventually("the opener's carrier to close") { pair.sync { pair.opener.isClosed } }
        let reported = pair.sync { pair.closes["opener"] }
        XCTAssertNil(try XCTUnwrap(reported, "onClose was called"), "an idle close is not an error")
        eventually("the acceptor to see the carrier end") { pair.sync { pair.acceptor.isClosed } }
    }

    // MARK: flow control

    func testUnreadStreamBlocksItsWriterAtTheWindowOnly() throws {
        let pair = try MuxPair()
        defer { pair.shutdown() }
        let (a, b) = try XCTUnwrap(pair.openStream([1]))
        let (c, d) = try XCTUnwrap(pair.openStream([2]))
        let probe = StreamProbe()
        pair.sync { _ = a.attachVirtual(probe, tag: 0) }
        let data = randomBytes(3 * MuxConnection.initialWindow, seed: 5)

        // Nobody reads b: the writer gets exactly one window in, then wouldBlock, and
        // stays blocked once the carrier has flushed everything (it is the window, not
        // the outgoing queue, that holds it).
        var (offset, end) = pair.sync { StreamIO.push(a, data, from: 0) }
        XCTAssertEqual(end, .wouldBlock)
        eventually("the opener's queue to drain") { pair.sync { pair.opener.pendingOutput == 0 } }
        (offset, end) = pair.sync { StreamIO.push(a, data, from: offset) }
        XCTAssertEqual(end, .wouldBlock)
        XCTAssertEqual(offset, MuxConnection.initialWindow, "a writer may be one window ahead of its reader")
        eventually("the window's bytes to reach the acceptor") { pair.sync { b.receiveAllowance == 0 } }

        // Another stream on the same carrier is not held up.
        let other = randomBytes(2 * MuxConnection.initialWindow, seed: 6)
        let through = pair.transfer(other, from: c, to: d, shutdown: true)
        XCTAssertEqual(through.end, .eof)
        XCTAssertTrue(through.received == other, "the other stream's bytes pass while the first is blocked")
        XCTAssertEqual(pair.sync { StreamIO.push(a, data, from: offset).offset }, offset, "still blocked")

        // Reading less than the credit step gives nothing back yet.
        let step = MuxConnection.initialWindow / 4
        let first = pair.sync { StreamIO.drain(b, limit: step - 1).bytes }
        XCTAssertTrue(first == Array(data[0..<step - 1]))
        // Frames keep their order on the carrier: once a byte the acceptor sent after that
        // read has arrived, a window frame from the read would have arrived before it.
        XCTAssertEqual(pair.transfer([1], from: d, to: c, shutdown: false).received, [1])
        XCTAssertEqual(pair.sync { StreamIO.push(a, data, from: offset).offset }, offset, "no credit below the step")

        // One more byte completes the step: the writer is woken and may send exactly that much more.
        pair.sync { XCTAssertEqual(StreamIO.drain(b, limit: 1).bytes, [data[step - 1]]) }
        eventually("the writer to be woken with credit") { pair.sync { probe.seen & EventBits.writable != 0 } }
        let resumed = pair.sync { StreamIO.push(a, data, from: offset) }
        XCTAssertEqual(resumed.end, .wouldBlock)
        XCTAssertEqual(resumed.offset, offset + step, "credit equals what the reader consumed")

        // The reader then drains everything, in order, and the rest flows as credit returns.
        let rest = pair.transfer(Array(data[resumed.offset...]), from: a, to: b, shutdown: true, timeout: 15)
        XCTAssertEqual(rest.end, .eof)
        XCTAssertTrue(Array(data[step...]) == rest.received, "all \(data.count) bytes in order after the stall")
    }

    /// A spliced stream whose socket reader stops: its bytes back up through the socket
    /// and the pipe into memory, the writer stops at the window, and once the reader
    /// resumes every byte arrives once and in order (pipe first, then memory).
    func testSplicedStreamWithAStalledReaderKeepsItsBytesInOrder() throws {
        let resources = LoopResources(pipes: PipePool(pipeSize: 65536), buffers: BufferPool(bufferSize: 16384))
        let pair = try MuxPair(pipes: resources.pipes)
        defer { pair.shutdown() }
        let (a, b) = try XCTUnwrap(pair.openStream([1]))
        let (local, inner) = try tcpPair()
        var small: Int32 = 16384
        setsockopt(local, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        setTimeouts(local, seconds: 10)
        let closed = expectation(description: "the relay closed")
        let reason = Mutex<CloseReason?>(nil)
        let relay = Box<CopyBidirectional>()
        pair.sync {
            relay.value = CopyBidirectional(loop: pair.runner.loop, resources: resources, a: b, b: TCPStream(fd: inner)) { _, r in
                reason.withLock { $0 = r }
                closed.fulfill()
            }
            try! relay.value!.start()
        }
        let probe = StreamProbe()
        pair.sync { _ = a.attachVirtual(probe, tag: 0) }
        let data = randomBytes(16 << 20, seed: 9)

        // Nobody reads `local`: the writer gets some way in and is then held back.
        var offset = 0
        var lastOffset = -1
        let deadline = Date().addingTimeInterval(10)
        while offset != lastOffset || pair.sync({ pair.opener.pendingOutput }) > 0 {
            XCTAssertLessThan(Date(), deadline, "the writer never stalled")
            if Date() > deadline { break }
            lastOffset = offset
            offset = pair.sync { StreamIO.push(a, data, from: offset).offset }
            usleep(20_000)
        }
        XCTAssertLessThan(offset, data.count, "a stalled reader holds the writer back")
        XCTAssertGreaterThan(offset, MuxConnection.initialWindow, "the first window went out")

        // The reader resumes; the writer finishes and half-closes.
        let received = Box<(bytes: [UInt8], error: Int32)>()
        let reader = Thread { received.value = readToEnd(local) }
        reader.start()
        let finished = Date().addingTimeInterval(20)
        var shut = false
        while !shut && Date() < finished {
            shut = pair.sync { () -> Bool in
                offset = StreamIO.push(a, data, from: offset).offset
                guard offset == data.count else { return false }
                XCTAssertNil(a.shutdownWrite())
                return true
            }
            if !shut { usleep(1000) }
        }
        XCTAssertTrue(shut, "all \(data.count) bytes written: \(offset)")
        eventually("the reader to see EOF", timeout: 20) { received.value != nil }
        let got = try XCTUnwrap(received.value)
        XCTAssertEqual(got.error, 0)
        XCTAssertEqual(got.bytes.count, data.count)
        XCTAssertTrue(got.bytes == data, "every byte once and in order")
        XCTAssertGreaterThan(pair.sync { resources.pipes.created }, 0, "payload was spliced")
        // The other way is still open: end it so the relay closes.
        pair.sync { a.close(reset: false) }
        close(local)
        wait(for: [closed], timeout: 10)
        pair.sync { relay.value = nil }
        XCTAssertEqual(pair.sync { resources.pipes.outstanding }, 0, "the stream gave its pipe back")
    }

    // MARK: protocol violations

    /// Writes `violation` at a MuxConnection (after opening a stream on it) and checks that
    /// the carrier is closed with an error naming the fault, and the open stream reset.
    private func assertViolationClosesCarrier(isOpener: Bool, before: [[UInt8]] = [], _ violation: [UInt8],
                                              mentioning: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let peer = try RawPeer(isOpener: isOpener)
        defer { peer.shutdown() }
        let stream: MuxStream
        if isOpener {
            stream = try XCTUnwrap(peer.runner.sync { peer.mux.open([0xAB, 0xCD]) }, file: file, line: line)
            var opened = [UInt8](repeating: 0, count: 11)
            XCTAssertEqual(read(peer.socket, &opened, 11), 11, file: file, line: line)
            XCTAssertEqual(opened, frame(1, stream.id, [0xAB, 0xCD]), "the open frame on the wire", file: file, line: line)
        } else {
            stream = try XCTUnwrap(peer.acceptStream(1), file: file, line: line)
        }
        let probe = StreamProbe()
        peer.runner.sync { _ = stream.attachVirtual(probe, tag: 0) }
        for f in before { peer.send(f) }
        peer.send(violation)

        XCTAssertEqual(peer.closed.wait(timeout: .now() + 5), .success, "onClose after the violation", file: file, line: line)
        let error = try XCTUnwrap(peer.runner.sync { peer.closeError } ?? nil, "onClose reports an error", file: file, line: line)
        XCTAssertTrue(error is MuxError, "\(error)", file: file, line: line)
        XCTAssertTrue("\(error)".contains(mentioning), "error names the fault: \(error)", file: file, line: line)
        XCTAssertTrue(peer.runner.sync { peer.mux.isClosed && peer.mux.streamCount == 0 }, file: file, line: line)
        XCTAssertEqual(peer.runner.sync { StreamIO.drain(stream).end }, .failed(SystemError("mux stream", errno: ECONNRESET)),
                       "the stream is reset", file: file, line: line)
        XCTAssertNotEqual(peer.runner.sync { probe.seen } & EventBits.error, 0, "its relay is woken", file: file, line: line)
        XCTAssertEqual(readToEnd(peer.socket).error, ECONNRESET, "the carrier is reset", file: file, line: line)
        XCTAssertEqual(peer.runner.sync { peer.runner.loop.registrationCount }, 0, file: file, line: line)
    }

    func testOversizePayloadClosesCarrier() throws {
        try assertViolationClosesCarrier(isOpener: false,
                                         frame(2, 1, length: UInt32(MuxConnection.maxPayload + 1)), mentioning: "exceeds")
    }

    func testOversizeControlFrameClosesCarrier() throws {
        try assertViolationClosesCarrier(isOpener: false,
                                         frame(5, 1, length: UInt32(MuxConnection.maxControlPayload + 1)), mentioning: "exceeds")
    }

    func testUnknownFrameTypeClosesCarrier() throws {
        try assertViolationClosesCarrier(isOpener: false, frame(6, 1), mentioning: "unknown mux frame type 6")
        try assertViolationClosesCarrier(isOpener: true, frame(0, 1), mentioning: "unknown mux frame type 0")
    }

    func testDataBeyondTheWindowClosesCarrier() throws {
        // Exactly one window is allowed (sent first, unread), one byte more is not.
        let full = frame(2, 1, [UInt8](repeating: 0x5A, count: MuxConnection.maxPayload))
        let window = [[UInt8]](repeating: full, count: MuxConnection.initialWindow / MuxConnection.maxPayload)
        try assertViolationClosesCarrier(isOpener: false, before: window, frame(2, 1, [1]), mentioning: "past its window")
    }

    func testWholeWindowOfUnreadDataIsAccepted() throws {
        let peer = try RawPeer(isOpener: false)
        defer { peer.shutdown() }
        let stream = try XCTUnwrap(peer.acceptStream(1))
        let full = frame(2, 1, [UInt8](repeating: 0x5A, count: MuxConnection.maxPayload))
        for _ in 0..<(MuxConnection.initialWindow / MuxConnection.maxPayload) { peer.send(full) }
        eventually("the whole window to arrive") { peer.runner.sync { stream.receiveAllowance == 0 } }
        XCTAssertFalse(peer.runner.sync { peer.mux.isClosed }, "a peer that stays within the window is fine")
        let got = peer.runner.sync { StreamIO.drain(stream) }
        XCTAssertEqual(got.bytes.count, MuxConnection.initialWindow)
        XCTAssertTrue(got.bytes.allSatisfy { $0 == 0x5A })
        XCTAssertEqual(got.end, .wouldBlock)
    }

    func testAcceptorOpensStreamsAboveTwoToThe31WhenTheOpenerTakesThem() throws {
        let pair = try MuxPair()
        var opened: [(MuxStream, [UInt8])] = []
        pair.sync {
            pair.opener.acceptsPeerStreams = true
            pair.opener.onOpen = { stream, payload in opened.append((stream, Array(payload))) }
        }
        let fromAcceptor = try XCTUnwrap(pair.sync { pair.acceptor.open([9, 9]) })
        XCTAssertGreaterThanOrEqual(fromAcceptor.id, 1 << 31)
        XCTAssertTrue(eventually("the opener's onOpen") { pair.sync { opened.count } == 1 })
        let (atOpener, payload) = pair.sync { opened[0] }
        XCTAssertEqual(payload, [9, 9])
        XCTAssertEqual(atOpener.id, fromAcceptor.id)
        let got = pair.transfer(Array("both ways".utf8), from: atOpener, to: fromAcceptor, shutdown: true)
        XCTAssertEqual(got.received, Array("both ways".utf8))
        // The opener's own streams stay below 2^31 next to the acceptor's.
        let (a, _) = try XCTUnwrap(pair.openStream())
        XCTAssertLessThan(a.id, 1 << 31)
    }

    func testOpenSentToTheOpenerClosesCarrier() throws {
        try assertViolationClosesCarrier(isOpener: true, frame(1, 7, [0, 0, 0, 0]), mentioning: "opened a stream on the opening side")
    }

    func testStreamOpenedTwiceClosesCarrier() throws {
        try assertViolationClosesCarrier(isOpener: false, frame(1, 1, [0, 0, 0, 1]), mentioning: "opened twice")
    }

    func testMalformedWindowFrameClosesCarrier() throws {
        try assertViolationClosesCarrier(isOpener: false, frame(5, 1, [0, 1]), mentioning: "malformed mux window")
    }

    func testCarrierEOFResetsStreamsAndReportsError() throws {
        let peer = try RawPeer(isOpener: false)
        defer { peer.shutdown() }
        let stream = try XCTUnwrap(peer.acceptStream(3))
        shutdown(peer.socket, Int32(SHUT_WR))
        XCTAssertEqual(peer.closed.wait(timeout: .now() + 5), .success)
        XCTAssertNotNil(peer.runner.sync { peer.closeError } ?? nil, "a carrier that ends under its streams is an error")
        XCTAssertEqual(peer.runner.sync { StreamIO.drain(stream).end }, .failed(SystemError("mux stream", errno: ECONNRESET)))
    }
}
