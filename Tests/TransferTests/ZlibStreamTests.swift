import Foundation
import Glibc
import XCTest
@testable import Transfer

// Two ZlibStreams over one loopback TCP connection with blocking sockets: the test
// thread writes through one, a reader thread inflates everything at the other.

/// Text that deflate shrinks a lot: numbered lines of words.
private func textBytes(_ count: Int) -> [UInt8] {
    let words = ["tunnel", "carrier", "stream", "window", "frame", "visitor", "service", "splice"]
    var out: [UInt8] = []
    out.reserveCapacity(count + 64)
    var i = 0
    while out.count < count {
        out += Array("\(i) \(words[i % 8]) \(words[(i * 3) % 8]) \(words[(i * 5 + 1) % 8])\n".utf8)
        i += 1
    }
    return Array(out.prefix(count))
}

private final class ZlibPair {
    let writer: ZlibStream
    let reader: ZlibStream
    private let received = Box<[UInt8]>()
    private let done = DispatchSemaphore(value: 0)
    private var wire = 0

    init() throws {
        let (x, y) = try tcpPair()
        // Both ends blocking, with timeouts, so a fault fails the test instead of hanging it.
        _ = fcntl(y, F_SETFL, fcntl(y, F_GETFL) & ~O_NONBLOCK)
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(y, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(x, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        writer = try ZlibStream(wrapping: TCPStream(fd: x))
        reader = try ZlibStream(wrapping: TCPStream(fd: y))
        received.value = []
        let thread = Thread { [reader, received, done] in
            var buf = [UInt8](repeating: 0, count: 65536)
            while case .bytes(let n) = buf.withUnsafeMutableBytes({ reader.read(into: $0.baseAddress!, count: $0.count) }) {
                received.value! += buf[0..<n]
            }
            done.signal()
        }
        thread.start()
    }

    /// Writes `bytes` in `chunk`-sized writes; the compressed bytes that went on the wire.
    @discardableResult
    func write(_ bytes: [UInt8], chunk: Int) -> Int {
        let before = writer.compressedOut
        var off = 0
        while off < bytes.count {
            let n = min(chunk, bytes.count - off)
            let r = bytes[off..<off + n].withUnsafeBytes { writer.write(from: $0.baseAddress!, count: n) }
            XCTAssertEqual(r, .bytes(n), "a blocking socket takes each write whole")
            off += n
        }
        return Int(writer.compressedOut - before)
    }

    /// Ends the writing side and returns everything the reader inflated.
    func finish() -> [UInt8] {
        XCTAssertNil(writer.shutdownWrite())
        XCTAssertEqual(done.wait(timeout: .now() + 20), .success, "the reader reached EOF")
        writer.close(reset: false)
        reader.close(reset: false)
        return received.value ?? []
    }
}

final class ZlibStreamTests: XCTestCase {
    func testIncompressibleInputGoesOutStoredAndTextIsCompressedAgainAfterwards() throws {
        let pair = try ZlibPair()
        let random = randomBytes(4 << 20, seed: 77)
        let text = textBytes(8 << 20)

        let first = pair.write(Array(random[0..<65536]), chunk: 65536)
        XCTAssertGreaterThan(first, 65536, "deflate cannot shrink random bytes")
        XCTAssertTrue(pair.writer.isStoring, "one write that did not shrink switches to stored blocks")
        let rest = pair.write(Array(random[65536...]), chunk: 65536)
        XCTAssertLessThan(rest, (random.count - 65536) + (random.count - 65536) / 500,
                          "stored blocks add under 0.2 % (\(rest) bytes for \(random.count - 65536))")

        // Text after it: the stored span runs out, the next try compresses, and the
        // stream stays compressing.
        let wireForText = pair.write(text, chunk: 65536)
        XCTAssertFalse(pair.writer.isStoring, "compressible input turns compression back on")
        XCTAssertLessThan(wireForText, text.count / 2, "text went out compressed: \(wireForText) bytes for \(text.count)")

        let got = pair.finish()
        XCTAssertEqual(got.count, random.count + text.count)
        XCTAssertTrue(got == random + text, "every byte arrives in order across the level changes")
    }

    func testSmallWritesAreNeverJudgedIncompressible() throws {
        let pair = try ZlibPair()
        let random = randomBytes(200 * 100, seed: 78)
        pair.write(random, chunk: 100)
        XCTAssertFalse(pair.writer.isStoring, "interactive-sized writes keep the configured level")
        let got = pair.finish()
        XCTAssertEqual(got.count, random.count)
        XCTAssertTrue(got == random)
    }

    func testCompressedTextArrivesIntactInSmallAndLargeWrites() throws {
        let pair = try ZlibPair()
        let text = textBytes(3 << 20)
        let wire = pair.write(Array(text[0..<(1 << 20)]), chunk: 1000) + pair.write(Array(text[(1 << 20)...]), chunk: 200_000)
        XCTAssertFalse(pair.writer.isStoring)
        XCTAssertLessThan(wire, text.count / 2)
        let got = pair.finish()
        XCTAssertTrue(got == text)
    }
}
