import XCTest
@testable import Culvert
import Transfer

/// The tunnel codec: every frame round-trips, each reader takes only its own set, and a
/// peer of version 3 still reads why it was refused.
final class TunnelProtocolTests: XCTestCase {
    private typealias P = TunnelProtocol

    private let nonce = TunnelCrypto.random(32)
    private let short = TunnelCrypto.random(16)

    /// Every frame of every set, encoded.
    private var everyFrame: [[UInt8]] {
        let proof = TunnelCrypto.random(32)
        let hello: [P.Hello] = [
            .controlHello(version: P.version, clientNonce: nonce),
            .dataHello(version: P.version, sessionID: short, channelNonce: short, proof: proof),
        ]
        let handshake: [P.ServerHandshake] = [
            .challenge(version: P.version, serverNonce: nonce, serverProof: proof),
            .welcome(sessionID: short),
            .refused(.init(.authFailed, "authentication failed")),
            .refused(.init(.version, "unsupported protocol version 9; this server speaks 4")),
        ]
        let auth = [P.ClientAuth(clientProof: proof, poolSize: 2, heartbeatMillis: 5000, muxChannels: 16)]
        let clientControl: [P.ClientControl] = [
            .registerService(.init(id: 7, kind: .udp, bindHost: "::1", port: 0, compress: true)),
            .registerService(.init(id: 1, kind: .tcp, bindHost: "", port: 2222)),
            .registerSecret(id: 3, name: "home-ssh"), .visit(name: "home-ssh"), .unregisterService(id: 3), .ping(1), .pong(42),
            .goodbye(reason: "stopped"), .useExit,
        ]
        let serverControl: [P.ServerControl] = [
            .serviceAccepted(id: 7, address: "[::]:20001"), .serviceRefused(id: 1, .init(.portInUse, "port 2222 is already in use")),
            .openData(channelNonce: short), .ping(.max), .pong(0), .goodbye(reason: "server shutting down"),
            .exitAccepted, .exitRefused(.init(.exitNotAllowed, "the server is no exit")),
        ]
        let data: [P.DataCommand] = [.connect(serviceID: 3, visitor: "127.0.0.1:5000"), .mux]
        let visitor: [P.VisitorFrame] = [.serviceHello(visitorNonce: nonce), .serviceProof(visitorProof: proof)]
        let answer: [P.VisitAnswer] = [
            .visitAccepted, .serviceChallenge(exposerNonce: nonce, exposerProof: proof), .serviceReady,
            .refused(.init(.wrongServiceToken, "wrong service token")),
        ]
        return hello.map(\.wire) + handshake.map(\.wire) + auth.map(\.wire) + clientControl.map(\.wire)
            + serverControl.map(\.wire) + data.map(\.wire) + visitor.map(\.wire) + answer.map(\.wire)
    }

    /// The frame decoded by `set`, or nil when that reader refuses it.
    private func decoded<F: P.FrameSet>(_ set: F.Type, _ frame: [UInt8]) -> F? {
        XCTAssertEqual(Int(frame[0]) << 24 | Int(frame[1]) << 16 | Int(frame[2]) << 8 | Int(frame[3]), frame.count - 4)
        return try? P.decode(set, type: frame[4], body: frame[5...])
    }

    private func roundTrips<F: P.FrameSet>(_ set: F.Type, _ frame: [UInt8]) -> Bool {
        guard let message = decoded(set, frame) else { return false }
        XCTAssertEqual(message.wire, frame)
        return true
    }

    private func codes<F: P.FrameSet>(_: F.Type) -> [(UInt8, String)] {
        F.Code.allCases.map { ($0.rawValue, "\($0)") }
    }

    func testEveryFrameRoundTripsThroughExactlyTheReadersWhoseSetHasIt() {
        for frame in everyFrame {
            let readers: [(String, Bool)] = [
                ("Hello", roundTrips(P.Hello.self, frame)),
                ("ServerHandshake", roundTrips(P.ServerHandshake.self, frame)),
                ("ClientAuth", roundTrips(P.ClientAuth.self, frame)),
                ("ClientControl", roundTrips(P.ClientControl.self, frame)),
                ("ServerControl", roundTrips(P.ServerControl.self, frame)),
                ("DataCommand", roundTrips(P.DataCommand.self, frame)),
                ("VisitorFrame", roundTrips(P.VisitorFrame.self, frame)),
                ("VisitAnswer", roundTrips(P.VisitAnswer.self, frame)),
            ]
            let takers = readers.filter(\.1).map(\.0)
            switch frame[4] {
            case 0x05: XCTAssertEqual(takers, ["ServerHandshake", "VisitAnswer"])   // refused
            case 0x30, 0x31, 0x32: XCTAssertEqual(takers, ["ClientControl", "ServerControl"])   // ping, pong, goodbye
            default: XCTAssertEqual(takers.count, 1, "frame type \(frame[4]) read by \(takers)")
            }
        }
    }

    func testReadersRejectFramesOfOtherChannels() {
        let ping = P.encode(P.ClientControl.ping(1))
        XCTAssertNil(decoded(P.Hello.self, ping))
        XCTAssertNil(decoded(P.DataCommand.self, ping))
        XCTAssertNil(decoded(P.ServerHandshake.self, P.encode(.openData(channelNonce: short))))
        XCTAssertNil(decoded(P.ServerControl.self, P.encode(P.ServerHandshake.refused(.init(.authFailed, "authentication failed")))))
        XCTAssertNil(decoded(P.ClientControl.self, P.encode(.controlHello(version: P.version, clientNonce: nonce))))
        XCTAssertNil(decoded(P.ClientAuth.self, P.encode(.visit(name: "x"))))
        XCTAssertNil(decoded(P.VisitAnswer.self, P.encode(.serviceHello(visitorNonce: nonce))))
        XCTAssertNil(decoded(P.VisitorFrame.self, P.encode(.serviceReady)))
        XCTAssertThrowsError(try P.decode(P.ClientControl.self, type: 0x7f, body: []))
    }

    func testTypeCodeMeansTheSameFrameInEverySet() {
        let all = codes(P.Hello.self) + codes(P.ServerHandshake.self) + codes(P.ClientAuth.self) + codes(P.ClientControl.self)
            + codes(P.ServerControl.self) + codes(P.DataCommand.self) + codes(P.VisitorFrame.self) + codes(P.VisitAnswer.self)
        var nameOf: [UInt8: String] = [:]
        var codeOf: [String: UInt8] = [:]
        for (code, name) in all {
            XCTAssertEqual(nameOf[code, default: name], name, "code 0x\(String(code, radix: 16))")
            XCTAssertEqual(codeOf[name, default: code], code, name)
            nameOf[code] = name
            codeOf[name] = code
        }
        XCTAssertEqual(nameOf.count, 26)
    }

    func testMalformedFramesAreRejected() {
        XCTAssertThrowsError(try P.decode(P.Hello.self, type: 0x01, body: [0, 4, 1, 2]))   // truncated nonce
        XCTAssertThrowsError(try P.decode(P.ClientControl.self, type: 0x31, body: ArraySlice([UInt8](repeating: 0, count: 9))))  // trailing
        XCTAssertThrowsError(try P.decode(P.ClientControl.self, type: 0x10, body: [0, 0, 0, 1, 9, 0, 0, 0, 80, 0]))  // service kind 9
        let text: [UInt8] = [0, 2] + Array("no".utf8)
        XCTAssertThrowsError(try P.decode(P.ServerHandshake.self, type: 0x05, body: ArraySlice(text + [0])))   // version code sent as a byte
        XCTAssertThrowsError(try P.decode(P.ServerHandshake.self, type: 0x05, body: ArraySlice(text + [200])))  // unknown code
        XCTAssertThrowsError(try P.decode(P.ServerHandshake.self, type: 0x05, body: ArraySlice(text + [1, 1])))  // trailing
        XCTAssertThrowsError(try P.decode(P.ClientControl.self, type: 0x14, body: [0, 2, 0xff, 0xfe]))  // not UTF-8
    }

    func testRefusalCarriesItsCodeAfterTheText() {
        let frame = P.encode(P.ServerHandshake.refused(.init(.serverFull, "full")))
        XCTAssertEqual(frame, [0, 0, 0, 8, 0x05, 0, 4] + Array("full".utf8) + [P.RefusalCode.serverFull.rawValue])
        let refused = P.encode(.serviceRefused(id: 9, .init(.portNotAllowed, "no")))
        XCTAssertEqual(Array(refused[5...]), [0, 0, 0, 9, 0, 2] + Array("no".utf8) + [P.RefusalCode.portNotAllowed.rawValue])
    }

    func testEveryRefusalCodeRoundTripsInBothRefusalFrames() throws {
        for code in P.RefusalCode.allCases {
            let refusal = P.Refusal(code, "because")
            XCTAssertEqual(decoded(P.ServerControl.self, P.encode(.serviceRefused(id: 5, refusal))), .serviceRefused(id: 5, refusal))
            XCTAssertEqual(decoded(P.VisitAnswer.self, P.encode(P.VisitAnswer.refused(refusal))), .refused(refusal))
        }
    }

    /// A version 3 peer decodes Refused as a string and nothing after it: the version
    /// refusal must stay exactly that, both ways.
    func testVersionRefusalKeepsTheVersion3Layout() throws {
        let reason = "unsupported protocol version 3; this server speaks 4"
        let v3Body = [UInt8(0), UInt8(reason.utf8.count)] + Array(reason.utf8)
        let frame = P.encode(P.ServerHandshake.refused(.init(.version, reason)))
        XCTAssertEqual(frame, [0, 0, 0, UInt8(1 + v3Body.count), 0x05] + v3Body)
        // What a version 3 server sends a version 4 client.
        XCTAssertEqual(try P.decode(P.ServerHandshake.self, type: 0x05, body: ArraySlice(v3Body)), .refused(.init(.version, reason)))
    }

    /// A hello of another version is read no further than its version, whatever follows.
    func testHelloOfAnotherVersionYieldsOnlyItsVersion() throws {
        let v3Hello: [UInt8] = [0, 3] + nonce
        XCTAssertEqual(try P.decode(P.Hello.self, type: 0x01, body: ArraySlice(v3Hello)), .controlHello(version: 3, clientNonce: []))
        XCTAssertEqual(try P.decode(P.Hello.self, type: 0x01, body: [0, 9, 1]), .controlHello(version: 9, clientNonce: []))
        XCTAssertEqual(try P.decode(P.Hello.self, type: 0x21, body: [0, 3]),
                       .dataHello(version: 3, sessionID: [], channelNonce: [], proof: []))
    }

    private func decodeOpen(_ payload: [UInt8]) throws -> (serviceID: UInt32, visitor: String) {
        try payload.withUnsafeBytes { bytes -> (serviceID: UInt32, visitor: String) in try P.decodeOpen(bytes) }
    }

    func testExitOpenPayloadRoundTripsEveryAddressType() throws {
        let destinations: [ProxyDestination] = [
            .name("example.com", port: 443),
            .address(SocketAddress(numericHost: "192.0.2.7", port: 80)!),
            .address(SocketAddress(numericHost: "2001:db8::1", port: 8080)!),
        ]
        for destination in destinations {
            let payload = P.encodeExitOpen(destination)
            XCTAssertEqual(try payload.withUnsafeBytes { try P.decodeExitOpen($0) }, destination)
            XCTAssertThrowsError(try (payload + [0]).withUnsafeBytes { try P.decodeExitOpen($0) }, "trailing bytes")
        }
        XCTAssertThrowsError(try [UInt8]([2, 0, 80]).withUnsafeBytes { try P.decodeExitOpen($0) }, "unknown address type")
        XCTAssertThrowsError(try ([3] + [0, 3] + Array("a b".utf8) + [0, 80]).withUnsafeBytes { try P.decodeExitOpen($0) }, "not a host name")
    }

    func testUDPExitStreamFramesCarryTheirDestination() throws {
        let open: [UInt8] = [P.datagramsKind]
        XCTAssertTrue(open.withUnsafeBytes { P.isDatagramsOpen($0) })
        // A server that predates UDP exit streams takes the kind byte for an address type and refuses it.
        XCTAssertThrowsError(try open.withUnsafeBytes { try P.decodeExitOpen($0) })
        let destinations: [ProxyDestination] = [
            .name("example.com", port: 53),
            .address(SocketAddress(numericHost: "192.0.2.7", port: 5353)!),
            .address(SocketAddress(numericHost: "2001:db8::1", port: 9)!),
        ]
        let payload: [UInt8] = [1, 2, 3]
        for destination in destinations {
            let frame = payload.withUnsafeBytes { P.datagramFrame(header: Socks5.datagramHeader(destination: destination), $0) }
            let length = Int(frame[0]) << 24 | Int(frame[1]) << 16 | Int(frame[2]) << 8 | Int(frame[3])
            XCTAssertEqual(length, frame.count - 4)
            let body = Array(frame[4...])
            let header = try XCTUnwrap(body.withUnsafeBytes { Socks5.parseDatagramHeader($0) })
            XCTAssertEqual(header.destination, destination)
            XCTAssertEqual(header.fragment, 0)
            XCTAssertEqual(Array(body[header.length...]), payload)
        }
    }

    func testMuxOpenPayloadRoundTrips() throws {
        let payload = P.encodeOpen(serviceID: 12, visitor: "[::1]:4000")
        let (id, visitor) = try decodeOpen(payload)
        XCTAssertEqual(id, 12)
        XCTAssertEqual(visitor, "[::1]:4000")
        XCTAssertThrowsError(try decodeOpen(payload + [0]))
    }
}
