import Foundation
import Glibc
import XCTest
@testable import Reactor
@testable import Transfer

final class ProxyHeaderTests: XCTestCase {
    private func address(_ host: String, _ port: UInt16) -> SocketAddress { SocketAddress(numericHost: host, port: port)! }

    private func complete(_ text: String) throws -> (ProxyHeader, Int) {
        try complete(Array(text.utf8))
    }

    private func complete(_ bytes: [UInt8]) throws -> (ProxyHeader, Int) {
        guard case .complete(let header, let length) = try ProxyHeader.parse(bytes) else {
            XCTFail("incomplete: \(bytes)")
            throw ProxyHeaderError.truncated
        }
        return (header, length)
    }

    private func refusal(_ bytes: [UInt8]) -> ProxyHeaderError? {
        do {
            _ = try ProxyHeader.parse(bytes)
            return nil
        } catch {
            return error
        }
    }

    /// The v2 header of the spec's layout, with `body` (addresses and TLVs) after it.
    private func v2(command: UInt8 = 0x21, family: UInt8 = 0x11, body: [UInt8]) -> [UInt8] {
        ProxyHeader.signature + [command, family, UInt8(body.count >> 8), UInt8(body.count & 0xFF)] + body
    }

    // MARK: the spec's examples

    func testReadsTheSpecsV1Examples() throws {
        let (h4, n4) = try complete("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n")
        XCTAssertEqual(h4, .proxied(source: address("192.168.0.1", 56324), destination: address("192.168.0.11", 443)))
        XCTAssertEqual(n4, 47)
        let line6 = "PROXY TCP6 ffff:f::ffff 2001:db8::1 65535 65535\r\n"
        let (h6, n6) = try complete(line6 + "x")
        XCTAssertEqual(h6, .proxied(source: address("ffff:f::ffff", 65535), destination: address("2001:db8::1", 65535)))
        XCTAssertEqual(n6, line6.utf8.count)
        XCTAssertEqual(try complete("PROXY UNKNOWN\r\n").0, .local)
        XCTAssertEqual(try complete("PROXY UNKNOWN ffff:f::ffff ffff:f::ffff 65535 65535\r\n").0, .local)
    }

    func testTheLongestV1LineFitsTheLimit() throws {
        // The spec's worst case: UNKNOWN with the longest addresses and ports.
        let longest = "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
        XCTAssertEqual(longest.utf8.count, ProxyHeader.v1MaxLength)
        XCTAssertEqual(try complete(longest).1, ProxyHeader.v1MaxLength)
    }

    func testReadsV2WithTLVsAndSkipsThem() throws {
        let addresses: [UInt8] = [10, 0, 0, 1, 10, 0, 0, 2, 0x1F, 0x90, 0x00, 0x50]
        let tlvs: [UInt8] = [0x01, 0x00, 0x02, 0x68, 0x32, 0x04, 0x00, 0x00, 0xEE, 0x00, 0x03, 1, 2, 3]
        let bytes = v2(body: addresses + tlvs)
        let (header, length) = try complete(bytes + Array("hello".utf8))
        XCTAssertEqual(header, .proxied(source: address("10.0.0.1", 8080), destination: address("10.0.0.2", 80)))
        XCTAssertEqual(length, bytes.count)
    }

    func testV2LocalAndUnspecKeepTheRealEndpoints() throws {
        XCTAssertEqual(try complete(v2(command: 0x20, family: 0x00, body: [])).0, .local)
        XCTAssertEqual(try complete(v2(command: 0x20, family: 0x11, body: [UInt8](repeating: 1, count: 12))).0, .local)
        XCTAssertEqual(try complete(v2(command: 0x21, family: 0x00, body: [])).0, .local)
        XCTAssertEqual(try complete(v2(command: 0x21, family: 0x12, body: [UInt8](repeating: 1, count: 12))).0, .local)
        XCTAssertEqual(try complete(v2(command: 0x21, family: 0x31, body: [UInt8](repeating: 0, count: 216))).0, .local)
    }

    // MARK: round trips

    func testRoundTripsEveryFamilyInBothVersions() throws {
        let pairs: [ProxyHeader] = [
            .local,
            .proxied(source: address("203.0.113.7", 40000), destination: address("127.0.0.1", 0)),
            .proxied(source: address("2001:db8::7", 1), destination: address("::1", 65535)),
        ]
        for header in pairs {
            for version in ProxyHeader.Version.allCases {
                let bytes = header.encode(version)
                let (parsed, length) = try complete(bytes + [0x16, 0x03])
                XCTAssertEqual(parsed, header, "\(version)")
                XCTAssertEqual(length, bytes.count, "\(version)")
            }
        }
    }

    func testMixedFamiliesTravelAsMappedIPv6() throws {
        let header = ProxyHeader.proxied(source: address("198.51.100.4", 5000), destination: address("::1", 80))
        XCTAssertEqual(String(decoding: header.encode(.v1), as: UTF8.self), "PROXY TCP6 ::ffff:198.51.100.4 ::1 5000 80\r\n")
        XCTAssertEqual(try complete(header.encode(.v2)).0,
                       .proxied(source: address("::ffff:198.51.100.4", 5000), destination: address("::1", 80)))
    }

    func testEveryPrefixOfAHeaderIsIncompleteNotRefused() throws {
        let headers = [ProxyHeader.proxied(source: address("192.0.2.1", 1234), destination: address("192.0.2.2", 443))]
        for version in ProxyHeader.Version.allCases {
            let bytes = headers[0].encode(version)
            for cut in 0..<bytes.count {
                guard case .incomplete(let upTo) = try ProxyHeader.parse(bytes[0..<cut]) else { return XCTFail("complete at \(cut)") }
                XCTAssertGreaterThan(upTo, cut)
            }
        }
    }

    // MARK: refusals

    func testRefusesWhatIsNotAHeader() {
        XCTAssertEqual(refusal(Array("GET / HTTP/1.1\r\n".utf8)), .missing)
        XCTAssertEqual(refusal(Array("PROXX TCP4".utf8)), .missing)
        XCTAssertEqual(refusal([0x16, 0x03, 0x01]), .missing)
        XCTAssertEqual(refusal([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0B]), .missing)
    }

    func testRefusesMalformedV1Lines() {
        let bad = [
            "PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",
            "PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n",
            "PROXY TCP4 ::1 192.168.0.11 56324 443\r\n",
            "PROXY TCP6 192.168.0.1 ::1 56324 443\r\n",
            "PROXY TCP4 192.168.0.1 192.168.0.256 56324 443\r\n",
            "PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
            "PROXY TCP4 192.168.0.1 192.168.0.11 0443 443\r\n",
            "PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n",
            "PROXY UDP4 192.168.0.1 192.168.0.11 1 443\r\n",
            "PROXY TCP4 192.168.0.1 192.168.0.11 1 443\n",
            "PROXY \r\n",
        ]
        for line in bad {
            guard case .malformed = refusal(Array(line.utf8)) else { return XCTFail("taken: \(line.debugDescription)") }
        }
    }

    func testRefusesAnOversizedV1Line() {
        let long = Array("PROXY TCP4 ".utf8) + [UInt8](repeating: 0x31, count: 100)
        XCTAssertEqual(refusal(long), .oversized(111))
        XCTAssertEqual(refusal(long + [0x0D, 0x0A]), .oversized(113))
    }

    func testRefusesMalformedV2Headers() {
        let addresses: [UInt8] = [10, 0, 0, 1, 10, 0, 0, 2, 0, 80, 0, 81]
        let cases: [(String, [UInt8])] = [
            ("version 1", v2(command: 0x11, body: addresses)),
            ("command 2", v2(command: 0x22, body: addresses)),
            ("family 4", v2(family: 0x41, body: addresses)),
            ("transport 3", v2(family: 0x13, body: addresses)),
            ("short IPv4 block", v2(body: Array(addresses[0..<8]))),
            ("short IPv6 block", v2(family: 0x21, body: addresses)),
            ("TLV past the end", v2(body: addresses + [0x01, 0x00, 0x05, 0x41])),
            ("half a TLV header", v2(body: addresses + [0x01, 0x00])),
        ]
        for (name, bytes) in cases {
            guard case .malformed = refusal(bytes) else { return XCTFail("taken: \(name)") }
        }
    }

    func testRefusesAnOversizedV2HeaderBeforeItArrives() {
        let fixed = ProxyHeader.signature + [0x21, 0x11, 0xFF, 0xFF]
        XCTAssertEqual(refusal(fixed), .oversized(16 + 65535))
    }

    // MARK: reading from a socket

    /// Sends `chunks` (with a pause between them) to a reader on a loop thread; returns
    /// its outcome and what the socket holds after it.
    private func readHeader(_ chunks: [[UInt8]], timeout: Duration = .seconds(5), closeAfter: Bool = false) throws
        -> (Result<ProxyHeader, ProxyHeaderError>, [UInt8]) {
        let thread = try LoopThread()
        defer { thread.stop() }
        let (outer, inner) = try tcpPair()
        defer { close(outer) }
        let done = DispatchSemaphore(value: 0)
        let result = Box<Result<ProxyHeader, ProxyHeaderError>>()
        thread.loop.execute {
            let reader = ProxyHeaderReader(loop: thread.loop, fd: inner, timeout: timeout) { outcome in
                result.value = outcome
                done.signal()
            }
            reader.start()
        }
        for chunk in chunks {
            sendAll(outer, chunk)
            usleep(20_000)
        }
        if closeAfter { shutdown(outer, Int32(SHUT_WR)) }
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        shutdown(outer, Int32(SHUT_WR))
        let rest = readToEnd(inner).bytes
        close(inner)
        return (result.value!, rest)
    }

    func testReaderTakesOnlyTheHeaderAndLeavesTheClientsBytes() throws {
        let header = ProxyHeader.proxied(source: address("192.0.2.9", 777), destination: address("192.0.2.1", 80))
        for version in ProxyHeader.Version.allCases {
            let bytes = header.encode(version)
            // Sent in dribbles, the first one shorter than any header.
            let (outcome, rest) = try readHeader([Array(bytes[0..<3]), Array(bytes[3..<20]), Array(bytes[20...]) + Array("hello".utf8)])
            XCTAssertEqual(try outcome.get(), header)
            XCTAssertEqual(rest, Array("hello".utf8))
        }
    }

    func testReaderRefusesAClientWithoutHeaderAtItsFirstBytes() throws {
        let (outcome, _) = try readHeader([Array("GET / HTTP/1.1\r\n".utf8)])
        XCTAssertEqual(outcome, .failure(.missing))
    }

    func testReaderCutsASlowSender() throws {
        let (outcome, _) = try readHeader([Array("PROXY TCP4 ".utf8)], timeout: .milliseconds(100))
        XCTAssertEqual(outcome, .failure(.timedOut))
    }

    func testReaderReportsAConnectionClosedInsideTheHeader() throws {
        let (outcome, _) = try readHeader([Array("PROXY TCP4 1.2".utf8)], closeAfter: true)
        XCTAssertEqual(outcome, .failure(.truncated))
    }
}
