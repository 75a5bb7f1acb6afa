import Glibc
import XCTest
@testable import Reactor
@testable import Transfer

// A TLS read that fails at the TLS level (SSL_ERROR_SSL) reports EPROTO; these check
// that the error also carries OpenSSL's reason, so a log line says what went wrong.

/// Client and server ends of TLS 1.3 with a pre-shared key over a non-blocking socket
/// pair, handshaken here by stepping both ends in turn.
private func handshakenPair() throws -> (client: TLSStream, server: TLSStream, clientFD: Int32, serverFD: Int32) {
    var fds: [Int32] = [0, 0]
    XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds), 0)
    for fd in fds { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
    let key = [UInt8](repeating: 0x42, count: 32)
    let client = try TLSStream(fd: fds[0], context: TLSContext.psk(key: key, server: false))
    let server = try TLSStream(fd: fds[1], context: TLSContext.psk(key: key, server: true))
    var clientDone = false
    var serverDone = false
    for _ in 0..<20 where !(clientDone && serverDone) {
        if !clientDone { clientDone = try client.handshakeStep() == .done }
        if !serverDone { serverDone = try server.handshakeStep() == .done }
    }
    XCTAssertTrue(clientDone && serverDone, "handshake did not finish")
    return (client, server, fds[0], fds[1])
}

/// What one read of `stream` says (the bytes it waits for are in the socket already).
private func readOnce(_ stream: TLSStream) -> IOResult {
    var buffer = [UInt8](repeating: 0, count: 4096)
    return buffer.withUnsafeMutableBytes { stream.read(into: $0.baseAddress!, count: $0.count) }
}

final class TLSStreamErrorTests: XCTestCase {
    func testPeerGoneWithoutCloseNotifyNamesTheUnexpectedEOF() throws {
        let pair = try handshakenPair()
        defer {
            pair.client.close(reset: true)
            pair.server.close(reset: true)
        }
        // The peer's socket ends without a close_notify (a killed process).
        XCTAssertEqual(shutdown(pair.serverFD, Int32(SHUT_RDWR)), 0)
        guard case .failed(let error) = readOnce(pair.client) else {
            return XCTFail("expected a failed read")
        }
        XCTAssertEqual(error.errno, EPROTO)
        XCTAssertEqual(error.call, "SSL_read: unexpected eof while reading")
        XCTAssertEqual("\(error)", "SSL_read: unexpected eof while reading: Protocol error (EPROTO)")
    }

    func testCorruptedRecordAndTheAlertItDrawsNameTheirReasons() throws {
        let pair = try handshakenPair()
        defer {
            pair.client.close(reset: true)
            pair.server.close(reset: true)
        }
        // An application-data record whose bytes are not what the server encrypted, as
        // interleaved or damaged output would arrive.
        let forged: [UInt8] = [0x17, 0x03, 0x03, 0x00, 0x20] + [UInt8](repeating: 0xA5, count: 32)
        XCTAssertEqual(forged.withUnsafeBytes { write(pair.serverFD, $0.baseAddress!, $0.count) }, forged.count)
        guard case .failed(let corrupted) = readOnce(pair.client) else {
            return XCTFail("expected the forged record to fail the read")
        }
        XCTAssertEqual(corrupted.errno, EPROTO)
        XCTAssertEqual(corrupted.call, "SSL_read: decryption failed or bad record mac")
        // The failed read sent the server a bad_record_mac alert.
        guard case .failed(let alerted) = readOnce(pair.server) else {
            return XCTFail("expected the alert to fail the peer's read")
        }
        XCTAssertEqual(alerted.errno, EPROTO)
        XCTAssertEqual(alerted.call, "SSL_read: sslv3 alert bad record mac")
    }

    func testExportedKeyingMaterialIsSharedBySessionAndDiffersAcrossSessions() throws {
        let first = try handshakenPair()
        let second = try handshakenPair()
        defer {
            for stream in [first.client, first.server, second.client, second.server] { stream.close(reset: true) }
        }
        let label = "EXPORTER-test"
        let a = try XCTUnwrap(first.client.keyingMaterial(label: label))
        XCTAssertEqual(a.count, 32)
        XCTAssertEqual(first.server.keyingMaterial(label: label), a)
        XCTAssertNotEqual(first.client.keyingMaterial(label: "EXPORTER-other"), a)
        // Same key, same peers, a new handshake: fresh randoms and key shares, new material.
        XCTAssertNotEqual(second.client.keyingMaterial(label: label), a)
    }
}
