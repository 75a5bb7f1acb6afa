import XCTest
@testable import Culvert

final class TunnelCryptoTests: XCTestCase {
    private func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

    func testHMACMatchesRFC4231Vectors() {
        // Test case 2: a short key.
        XCTAssertEqual(hex(TunnelCrypto.hmacSHA256(key: Array("Jefe".utf8), Array("what do ya want ".utf8), Array("for nothing?".utf8))),
                       "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        // Test case 6: a key longer than the block, which is hashed first.
        XCTAssertEqual(hex(TunnelCrypto.hmacSHA256(key: [UInt8](repeating: 0xaa, count: 131),
                                                   Array("Test Using Larger Than Block-Size Key - Hash Key First".utf8))),
                       "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
    }

    func testRandomBytesDoNotRepeat() {
        var seen = Set<[UInt8]>()
        for _ in 0..<2_000 { XCTAssertTrue(seen.insert(TunnelCrypto.random(16)).inserted) }
        XCTAssertEqual(TunnelCrypto.random(5000).count, 5000)
    }

    func testProofsDependOnRoleNoncesAndKey() {
        let key = TokenKeys(token: "t").auth
        let a = TunnelCrypto.random(32), b = TunnelCrypto.random(32)
        let client = TunnelProtocol.clientProof(key: key, clientNonce: a, serverNonce: b)
        XCTAssertNotEqual(client, TunnelProtocol.serverProof(key: key, clientNonce: a, serverNonce: b))
        XCTAssertNotEqual(client, TunnelProtocol.clientProof(key: key, clientNonce: b, serverNonce: a))
        XCTAssertNotEqual(client, TunnelProtocol.clientProof(key: TokenKeys(token: "u").auth, clientNonce: a, serverNonce: b))
        XCTAssertEqual(client, TunnelProtocol.clientProof(key: key, clientNonce: a, serverNonce: b))
    }

    func testChannelBindingProofsDependOnSignerSessionAndToken() {
        let binding = ChannelBinding(keys: TokenKeys(token: "t"))
        let session = TunnelCrypto.random(32)
        let client = binding.proof(by: .client, session: session)
        XCTAssertTrue(binding.verify(client, by: .client, session: session))
        // The server's proof is not the client's echoed back, and neither carries over to
        // another session or holds under another token.
        XCTAssertFalse(binding.verify(client, by: .server, session: session))
        XCTAssertFalse(binding.verify(client, by: .client, session: TunnelCrypto.random(32)))
        XCTAssertFalse(ChannelBinding(keys: TokenKeys(token: "u")).verify(client, by: .client, session: session))
        XCTAssertFalse(binding.verify(client + ", " + client, by: .client, session: session))
        XCTAssertNotEqual(TokenKeys(token: "t").channelBinding, TokenKeys(token: "t").auth)
    }

    func testChannelBindingProofsMatchTheWireFormat() {
        // Computed apart (Python hmac/hashlib) from PROTOCOL.md: K = HKDF-SHA256("t", info
        // "culvert/1 ws channel binding"), proof = base64(HMAC(K, "culvert/1 ROLE binding" || E)).
        let binding = ChannelBinding(keys: TokenKeys(token: "t"))
        let session = (0..<32).map { UInt8($0) }
        XCTAssertEqual(binding.proof(by: .client, session: session), "rO4Zdja9Z85lmowGQ9uuT5SOrF6K8ajwRLgAfe5boac=")
        XCTAssertEqual(binding.proof(by: .server, session: session), "47mIZMbXKg60X7mPWmv+kJmAKBFS59SfQdlOiYwabN0=")
    }
}
