import Foundation
import Glibc
import XCTest
@testable import Reactor
@testable import Transfer

private func setNonBlocking(_ fd: Int32) {
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
}

final class AsyncDuplexTests: XCTestCase {
    private func setBuffer(_ fd: Int32, _ option: Int32, _ bytes: Int32) {
        var value = bytes
        XCTAssertEqual(setsockopt(fd, SOL_SOCKET, option, &value, socklen_t(MemoryLayout<Int32>.size)), 0)
    }

    func testSendFailsOnceThePeerStopsReadingAndMoreThanTheCapIsQueued() throws {
        let (outer, inner) = try tcpPair()
        defer { close(outer) }
        // Small kernel buffers: the queue in memory fills after a few KiB on the wire.
        setBuffer(outer, SO_RCVBUF, 4096)
        setBuffer(inner, SO_SNDBUF, 4096)
        setNonBlocking(inner)
        let runner = try LoopThread()
        defer { runner.stop() }
        let loop = runner.loop
        let limit = 64 * 1024
        let channel = runner.sync { try? AsyncDuplex(loop: loop, duplex: TCPStream(fd: inner), sendLimit: limit) }
        let control = try XCTUnwrap(channel)

        let readFailed = DispatchSemaphore(value: 0)
        let readError = Box<Error>()
        runner.loop.execute {
            Task(executorPreference: loop.tasks) {
                do { _ = try await control.read(max: 1) } catch { readError.value = error }
                readFailed.signal()
            }
        }
        let frame = [UInt8](repeating: 0x30, count: 1024)
        let sent = runner.sync { () -> Int in
            var sent = 0
            while control.isOpen && sent < 64 << 20 {
                control.send(frame)
                sent += frame.count
            }
            return sent
        }
        XCTAssertFalse(runner.sync { control.isOpen })
        XCTAssertLessThan(sent, 4 * limit, "the channel failed long after the cap")
        XCTAssertEqual(readFailed.wait(timeout: .now() + 10), .success)
        guard case .peerNotReading(let queued, let cap)? = readError.value as? ChannelError else {
            return XCTFail("read ended with \(String(describing: readError.value))")
        }
        XCTAssertEqual(cap, limit)
        XCTAssertGreaterThan(queued, limit)
        XCTAssert("\(ChannelError.peerNotReading(queued: queued, limit: cap))".hasPrefix("peer is not reading: "))

        // The queued bytes are dropped and the peer sees the connection reset, not a clean end.
        let (_, error) = readToEnd(outer)
        XCTAssertEqual(error, ECONNRESET)
    }

    func testSlowReaderBelowTheCapGetsEveryByteInOrder() throws {
        let (outer, inner) = try tcpPair()
        // Smaller than one burst, so most writes are partial; not so small that delayed
        // acks slow loopback to a crawl.
        setBuffer(inner, SO_SNDBUF, 32 * 1024)
        setNonBlocking(inner)
        let runner = try LoopThread()
        defer { runner.stop() }
        let loop = runner.loop
        let limit = 256 * 1024
        let channel = runner.sync { try? AsyncDuplex(loop: loop, duplex: TCPStream(fd: inner), sendLimit: limit) }
        let control = try XCTUnwrap(channel)

        let data = randomBytes(4 << 20, seed: 7)
        let chunk = 16 * 1024
        let received = Box<[UInt8]>()
        let readerDone = DispatchSemaphore(value: 0)
        Thread {
            // Reads a little at a time, so the sender's writes are mostly partial.
            var out: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 3000)
            while true {
                let n = read(outer, &buf, buf.count)
                if n <= 0 { break }
                out.append(contentsOf: buf[0..<n])
                usleep(50)
            }
            close(outer)
            received.value = out
            readerDone.signal()
        }.start()

        let senderDone = DispatchSemaphore(value: 0)
        let sendError = Box<Error>()
        runner.loop.execute {
            Task(executorPreference: loop.tasks) {
                do {
                    // At most eight chunks (128 KiB) between waits: under the cap throughout.
                    for (i, start) in stride(from: 0, to: data.count, by: chunk).enumerated() {
                        control.send(Array(data[start..<start + chunk]))
                        if i % 8 == 7 { try await control.flush() }
                    }
                    try await control.flush()
                } catch {
                    sendError.value = error
                }
                control.close()
                senderDone.signal()
            }
        }
        XCTAssertEqual(senderDone.wait(timeout: .now() + 30), .success)
        XCTAssertNil(sendError.value)
        XCTAssertEqual(readerDone.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(received.value?.count, data.count)
        XCTAssert(received.value == data, "bytes arrived changed or out of order")
    }
}
