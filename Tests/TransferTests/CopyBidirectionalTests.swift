import Foundation
import Glibc
import Synchronization
import XCTest
@testable import Reactor
@testable import Transfer

/// A connected loopback TCP pair: `outer` stays blocking for the test thread, `inner`
/// is non-blocking for the relay.
func tcpPair() throws -> (outer: Int32, inner: Int32) {
    let listener = try Net.listen(SocketAddress(numericHost: "127.0.0.1", port: 0)!, reusePort: false)
    defer { close(listener) }
    let address = try Net.localAddress(listener)
    let outer = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    let rc = try address.withSockAddr { (sa, len) throws(SystemError) in connect(outer, sa, len) }
    XCTAssertEqual(rc, 0)
    var inner: Int32 = -1
    for _ in 0..<1000 {
        if let (fd, _) = try Net.accept(listener) { inner = fd; break }
        usleep(1000)
    }
    XCTAssertGreaterThanOrEqual(inner, 0)
    return (outer, inner)
}

func sendAll(_ fd: Int32, _ data: [UInt8]) {
    var off = 0
    while off < data.count {
        let n = data[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if n <= 0 { return }
        off += n
    }
}

func readToEnd(_ fd: Int32) -> (bytes: [UInt8], error: Int32) {
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &buf, buf.count)
        if n > 0 { out.append(contentsOf: buf[0..<n]); continue }
        return (out, n == 0 ? 0 : errno)
    }
}

func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var state = seed &+ 0x9E37_79B9_7F4A_7C15
    var out = [UInt8](repeating: 0, count: count)
    for i in 0..<count {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        out[i] = UInt8(truncatingIfNeeded: state)
    }
    return out
}

final class LoopThread {
    let loop: EventLoop
    private let done = DispatchSemaphore(value: 0)
    init() throws {
        let loop = try EventLoop()
        self.loop = loop
        let done = self.done
        Thread { loop.run(); done.signal() }.start()
    }
    func sync<T>(_ body: @escaping () -> T) -> T {
        let sem = DispatchSemaphore(value: 0)
        let box = Box<T>()
        loop.execute { box.value = body(); sem.signal() }
        sem.wait()
        return box.value!
    }
    func stop() { loop.stop(); done.wait() }
    /// Keeps the loop thread busy until the returned closure is called, so events
    /// pile up and reach the handler together.
    func hold() -> () -> Void {
        let held = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        loop.execute { held.signal(); release.wait() }
        held.wait()
        return { release.signal() }
    }
}

final class Box<T>: @unchecked Sendable { var value: T? }

final class CopyBidirectionalTests: XCTestCase {
    /// Relays x <-> y through a <-> b and returns what the close callback reported.
    /// `exercise` owns x and y and closes them.
    private func relay(splice: Bool, idleTimeout: Duration? = nil,
                       exercise: (_ x: Int32, _ y: Int32, _ runner: LoopThread) -> Void) throws -> (CloseReason, UInt64, UInt64, LoopResources) {
        let (x, a) = try tcpPair()
        let (y, b) = try tcpPair()
        let runner = try LoopThread()
        defer { runner.stop() }
        let resources = LoopResources(pipes: PipePool(pipeSize: 65536), buffers: BufferPool(bufferSize: 16384))
        let closed = expectation(description: "relay closed")
        let result = Mutex<(CloseReason, UInt64, UInt64)?>(nil)
        runner.sync {
            let relay = CopyBidirectional(loop: runner.loop, resources: resources,
                                          a: TCPStream(fd: a), b: TCPStream(fd: b),
                                          preferSplice: splice, idleTimeout: idleTimeout) { r, reason in
                result.withLock { $0 = (reason, r.bytesAToB, r.bytesBToA) }
                closed.fulfill()
            }
            XCTAssertEqual(relay.usesSplice, splice)
            try! relay.start()
        }
        exercise(x, y, runner)
        wait(for: [closed], timeout: 30)
        let r = result.withLock { $0 }!
        XCTAssertEqual(runner.sync { runner.loop.registrationCount }, 0)
        XCTAssertEqual(runner.sync { runner.loop.timerCount }, 0)
        return (r.0, r.1, r.2, resources)
    }

    private func bothWaysWithHalfClose(splice: Bool) throws {
        let up = randomBytes(3 << 20, seed: 1)
        let down = randomBytes(5 << 20, seed: 2)
        let gotAtY = Box<[UInt8]>()
        let gotAtX = Box<[UInt8]>()
        let (reason, aToB, bToA, resources) = try relay(splice: splice) { x, y, _ in
            let g = DispatchGroup()
            DispatchQueue.global().async(group: g) { sendAll(x, up); shutdown(x, Int32(SHUT_WR)) }
            DispatchQueue.global().async(group: g) { gotAtY.value = readToEnd(y).bytes; sendAll(y, down); shutdown(y, Int32(SHUT_WR)) }
            DispatchQueue.global().async(group: g) { gotAtX.value = readToEnd(x).bytes }
            g.wait()
            close(x)
            close(y)
        }
        XCTAssertEqual(reason, .eof)
        XCTAssertEqual(gotAtY.value, up, "a->b bytes intact")
        XCTAssertEqual(gotAtX.value, down, "b->a bytes sent after a's half-close arrive whole")
        XCTAssertEqual(aToB, UInt64(up.count))
        XCTAssertEqual(bToA, UInt64(down.count))
        // Idle connections hold no carrier: everything borrowed came back.
        XCTAssertEqual(resources.pipes.outstanding, 0)
        XCTAssertEqual(resources.buffers.outstanding, 0)
        if splice { XCTAssertGreaterThan(resources.pipes.created, 0) } else { XCTAssertEqual(resources.pipes.created, 0) }
    }

    func testSpliceRelayCarriesBothWaysAndHalfClose() throws { try bothWaysWithHalfClose(splice: true) }

    func testBufferedRelayCarriesBothWaysAndHalfClose() throws { try bothWaysWithHalfClose(splice: false) }

    func testSmallExchangesCopyThroughBuffersEvenWhenSpliceIsPreferred() throws {
        let (reason, aToB, bToA, resources) = try relay(splice: true) { x, y, _ in
            sendAll(x, Array("GET / HTTP/1.1\r\n\r\n".utf8))
            shutdown(x, Int32(SHUT_WR))
            XCTAssertEqual(readToEnd(y).bytes.count, 18)
            sendAll(y, Array("HTTP/1.1 200 OK\r\n\r\nhello".utf8))
            shutdown(y, Int32(SHUT_WR))
            XCTAssertEqual(readToEnd(x).bytes.count, 24)
            close(x)
            close(y)
        }
        XCTAssertEqual(reason, .eof)
        XCTAssertEqual(aToB, 18)
        XCTAssertEqual(bToA, 24)
        XCTAssertEqual(resources.pipes.created, 0, "no pipe for a few bytes")
        XCTAssertEqual(resources.buffers.outstanding, 0)
    }

    private func resetPropagates(splice: Bool) throws {
        var peerError: Int32 = 0
        let (reason, _, _, resources) = try relay(splice: splice) { x, y, _ in
            sendAll(x, [1, 2, 3])
            var buf = [UInt8](repeating: 0, count: 3)
            XCTAssertEqual(read(y, &buf, 3), 3)
            var l = linger(l_onoff: 1, l_linger: 0)
            setsockopt(x, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
            close(x)
            peerError = readToEnd(y).error
            close(y)
        }
        guard case .reset(let e) = reason else { return XCTFail("expected reset, got \(reason)") }
        XCTAssertEqual(e.errno, ECONNRESET)
        XCTAssertEqual(peerError, ECONNRESET, "the reset is passed on to the other side")
        XCTAssertEqual(resources.pipes.outstanding, 0)
        XCTAssertEqual(resources.buffers.outstanding, 0)
    }

    func testSpliceRelayEndsWhenOneSideGoesAway() throws { try resetPropagates(splice: true) }

    func testBufferedRelayEndsWhenOneSideGoesAway() throws { try resetPropagates(splice: false) }

    /// A peer's last bytes and its RST reach the relay's socket in one batch of events
    /// (the loop is held meanwhile): the bytes are passed on first, then the reset.
    /// - Parameter fromB: y sends and resets, while x's bytes wait for the relay too, so
    ///   writing toward the reset side is what fails first.
    private func bytesBeforeResetArriveFirst(splice: Bool, fromB: Bool) throws {
        let last = randomBytes(100_000, seed: 3)
        var atPeer: (bytes: [UInt8], error: Int32) = ([], 0)
        let (reason, _, _, resources) = try relay(splice: splice) { x, y, runner in
            let (sender, receiver) = fromB ? (y, x) : (x, y)
            let release = runner.hold()
            if fromB { sendAll(x, [1, 2, 3]) }
            sendAll(sender, last)
            var l = linger(l_onoff: 1, l_linger: 0)
            setsockopt(sender, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
            close(sender)
            release()
            atPeer = readToEnd(receiver)
            close(receiver)
        }
        guard case .reset(let e) = reason else { return XCTFail("expected reset, got \(reason)") }
        XCTAssertEqual(e.errno, ECONNRESET)
        XCTAssertEqual(atPeer.bytes.count, last.count)
        XCTAssertTrue(atPeer.bytes == last, "the bytes sent before the reset arrive intact")
        XCTAssertEqual(atPeer.error, ECONNRESET, "after them, the reset is passed on")
        XCTAssertEqual(resources.pipes.outstanding, 0)
        XCTAssertEqual(resources.buffers.outstanding, 0)
    }

    func testSpliceRelayPassesOnBytesSentJustBeforeAReset() throws {
        try bytesBeforeResetArriveFirst(splice: true, fromB: false)
    }

    func testBufferedRelayPassesOnBytesSentJustBeforeAReset() throws {
        try bytesBeforeResetArriveFirst(splice: false, fromB: false)
    }

    func testSpliceRelayPassesOnBytesSentJustBeforeAResetWhileTheOtherWayWrites() throws {
        try bytesBeforeResetArriveFirst(splice: true, fromB: true)
    }

    func testBufferedRelayPassesOnBytesSentJustBeforeAResetWhileTheOtherWayWrites() throws {
        try bytesBeforeResetArriveFirst(splice: false, fromB: true)
    }

    func testIdleTimeoutClosesQuietRelay() throws {
        let start = MonotonicClock.now()
        var xError: Int32 = -1
        let (reason, _, _, _) = try relay(splice: true, idleTimeout: .milliseconds(200)) { x, y, _ in
            xError = readToEnd(x).error
            close(x)
            close(y)
        }
        XCTAssertEqual(reason, .idleTimeout)
        XCTAssertEqual(xError, ECONNRESET)
        XCTAssertGreaterThanOrEqual(MonotonicClock.now() - start, 200_000_000)
    }

    func testBackpressureBoundsBytesInFlight() throws {
        // The reader at y stalls: the relay must stop reading from x instead of buffering
        // without bound, so the writer at x blocks.
        let (x, a) = try tcpPair()
        let (y, b) = try tcpPair()
        defer { close(x); close(y) }
        let runner = try LoopThread()
        defer { runner.stop() }
        let resources = LoopResources(pipes: PipePool(pipeSize: 65536), buffers: BufferPool(bufferSize: 16384))
        let relay = runner.sync { () -> CopyBidirectional in
            let r = CopyBidirectional(loop: runner.loop, resources: resources, a: TCPStream(fd: a), b: TCPStream(fd: b)) { _, _ in }
            try! r.start()
            return r
        }
        _ = fcntl(x, F_SETFL, fcntl(x, F_GETFL) | O_NONBLOCK)
        let chunk = [UInt8](repeating: 9, count: 65536)
        var written = 0
        let deadline = Date().addingTimeInterval(5)
        var stalls = 0
        while Date() < deadline && stalls < 50 {
            let n = write(x, chunk, chunk.count)
            if n > 0 { written += n; stalls = 0 } else { stalls += 1; usleep(2000) }
        }
        XCTAssertLessThan(written, 64 << 20, "writer blocked: the relay stopped reading")
        XCTAssertLessThanOrEqual(runner.sync { resources.pipes.outstanding }, 1, "one pipe's worth in flight, no more")
        runner.sync { relay.abort(.drainTimeout) }
        XCTAssertEqual(resources.pipes.outstanding, 0)
    }
}
