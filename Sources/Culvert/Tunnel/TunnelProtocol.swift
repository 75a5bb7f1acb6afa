import Transfer

/// The culvert tunnel wire protocol, version 3 (docs/PROTOCOL.md): every message of the
/// control and data channels, their encoding, and the proofs. This file is the codec;
/// nothing else knows byte layouts.
///
/// Frame: u32 big-endian length of what follows (type byte + body), u8 type, body.
/// Integers are big-endian; strings and byte strings are u16 length + bytes.
enum TunnelProtocol {
    /// 2 added multiplexed data channels (`clientAuth` carries their count, `mux`);
    /// 3 raised the payload limit of their data frames to 256 KiB.
    static let version: UInt16 = 3
    /// The most multiplexed data channels a client may ask for.
    static let maxMuxChannels = 16
    /// Hard limit on a frame (type + body); larger frames end the connection.
    static let maxFrame = 16 * 1024
    static let nonceSize = 32
    static let channelNonceSize = 16
    static let sessionIDSize = 16
    static let proofSize = 32

    /// A 16-byte nonce or session id as a dictionary key: two words hash far faster
    /// than an array of bytes.
    struct Key16: Hashable {
        let high: UInt64
        let low: UInt64
        init(_ bytes: [UInt8]) {
            var h: UInt64 = 0
            var l: UInt64 = 0
            for (i, b) in bytes.prefix(16).enumerated() {
                if i < 8 { h = h << 8 | UInt64(b) } else { l = l << 8 | UInt64(b) }
            }
            high = h
            low = l
        }
    }

    enum ServiceKind: UInt8 {
        case tcp = 1
        /// Datagrams, framed with the visitor's address on one data channel.
        case udp = 2
    }

    /// One registered service as the client asks for it.
    struct ServiceRequest: Equatable {
        var id: UInt32
        var kind: ServiceKind
        /// Empty: the server's default bind address.
        var bindHost: String
        /// 0: the server picks a free allowed port.
        var port: UInt16
        /// Data channels of this service carry deflate-compressed bytes.
        var compress: Bool = false
    }

    enum Message: Equatable {
        /// client → server, first frame of a control channel.
        case controlHello(version: UInt16, clientNonce: [UInt8])
        /// server → client: its nonce and its proof of the token.
        case challenge(version: UInt16, serverNonce: [UInt8], serverProof: [UInt8])
        /// client → server: the client's proof, its pool size, heartbeat interval (ms) and
        /// how many multiplexed data channels carry its TCP visitors (0: a dedicated
        /// data channel per visitor).
        case clientAuth(clientProof: [UInt8], poolSize: UInt16, heartbeatMillis: UInt32, muxChannels: UInt8)
        /// server → client: authenticated; the session's id.
        case welcome(sessionID: [UInt8])
        /// Either way: refusal with a reason, then the connection closes.
        case refused(reason: String)
        case registerService(ServiceRequest)
        case serviceAccepted(id: UInt32, address: String)
        case serviceRefused(id: UInt32, reason: String)
        /// server → client on the control channel: open one data channel with this nonce.
        case openData(channelNonce: [UInt8])
        /// client → server, first frame of a data channel: one-time proof for the nonce.
        case dataHello(version: UInt16, sessionID: [UInt8], channelNonce: [UInt8], proof: [UInt8])
        /// server → client on a data channel: a visitor for this service; raw bytes follow.
        case connect(serviceID: UInt32, visitor: String)
        /// server → client on a data channel: it carries multiplexed streams from now on
        /// (Transfer/Mux.swift frames); each stream opens with `encodeOpen`'s payload.
        case mux
        case ping(UInt64)
        case pong(UInt64)
        /// client → server: a secret service, reachable only by visitors who know its token.
        case registerSecret(id: UInt32, name: String)
        /// visitor → server after welcome: pair this connection with the named secret service.
        case visit(name: String)
        /// server → visitor: paired; what follows is the exposing client's end.
        case visitAccepted
        /// visitor → exposer, end to end through the server: the visitor's nonce.
        case serviceHello(visitorNonce: [UInt8])
        /// exposer → visitor: its nonce and its proof of the service token.
        case serviceChallenge(exposerNonce: [UInt8], exposerProof: [UInt8])
        /// visitor → exposer: the visitor's proof of the service token.
        case serviceProof(visitorProof: [UInt8])
        /// exposer → visitor: accepted and connected to the local service; raw bytes follow.
        case serviceReady
    }

    private enum TypeCode: UInt8 {
        case controlHello = 0x01, challenge = 0x02, clientAuth = 0x03, welcome = 0x04, refused = 0x05
        case registerService = 0x10, serviceAccepted = 0x11, serviceRefused = 0x12
        case openData = 0x20, dataHello = 0x21, connect = 0x22, mux = 0x23
        case ping = 0x30, pong = 0x31
        case registerSecret = 0x13, visit = 0x14, visitAccepted = 0x15
        case serviceHello = 0x40, serviceChallenge = 0x41, serviceProof = 0x42, serviceReady = 0x43
    }

    // MARK: proofs

    static func serverProof(key: [UInt8], clientNonce: [UInt8], serverNonce: [UInt8]) -> [UInt8] {
        TunnelCrypto.hmacSHA256(key: key, Array("culvert/1 server".utf8), be(version), clientNonce, serverNonce)
    }

    static func clientProof(key: [UInt8], clientNonce: [UInt8], serverNonce: [UInt8]) -> [UInt8] {
        TunnelCrypto.hmacSHA256(key: key, Array("culvert/1 client".utf8), be(version), clientNonce, serverNonce)
    }

    /// The per-session key for data-channel proofs; never sent.
    static func sessionKey(key: [UInt8], clientNonce: [UInt8], serverNonce: [UInt8]) -> [UInt8] {
        TunnelCrypto.hmacSHA256(key: key, Array("culvert/1 session".utf8), be(version), clientNonce, serverNonce)
    }

    static func dataProof(sessionKey: [UInt8], sessionID: [UInt8], channelNonce: [UInt8]) -> [UInt8] {
        TunnelCrypto.hmacSHA256(key: sessionKey, Array("culvert/1 data".utf8), sessionID, channelNonce)
    }

    /// The key both ends of a secret service derive from its token; the server never has it.
    static func secretKey(serviceToken: String, name: String) -> [UInt8] {
        TunnelCrypto.hkdf(secret: Array(serviceToken.utf8), info: "culvert/1 secret service \(name)")
    }

    static func exposerProof(key: [UInt8], name: String, visitorNonce: [UInt8], exposerNonce: [UInt8]) -> [UInt8] {
        TunnelCrypto.hmacSHA256(key: key, Array("culvert/1 exposer".utf8), Array(name.utf8), visitorNonce, exposerNonce)
    }

    static func visitorProof(key: [UInt8], name: String, visitorNonce: [UInt8], exposerNonce: [UInt8]) -> [UInt8] {
        TunnelCrypto.hmacSHA256(key: key, Array("culvert/1 visitor".utf8), Array(name.utf8), visitorNonce, exposerNonce)
    }

    // MARK: encoding

    static func encode(_ message: Message) -> [UInt8] {
        var body: [UInt8] = []
        let type: TypeCode
        switch message {
        case .controlHello(let v, let n):
            type = .controlHello; body = be(v) + n
        case .challenge(let v, let n, let p):
            type = .challenge; body = be(v) + n + p
        case .clientAuth(let p, let pool, let hb, let mux):
            type = .clientAuth; body = p + be(pool) + be(hb) + [mux]
        case .welcome(let id):
            type = .welcome; body = id
        case .refused(let reason):
            type = .refused; body = string(reason)
        case .registerService(let s):
            type = .registerService; body = be(s.id) + [s.kind.rawValue] + string(s.bindHost) + be(s.port) + [s.compress ? 1 : 0]
        case .serviceAccepted(let id, let address):
            type = .serviceAccepted; body = be(id) + string(address)
        case .serviceRefused(let id, let reason):
            type = .serviceRefused; body = be(id) + string(reason)
        case .openData(let n):
            type = .openData; body = n
        case .dataHello(let v, let id, let n, let p):
            type = .dataHello; body = be(v) + id + n + p
        case .connect(let id, let visitor):
            type = .connect; body = be(id) + string(visitor)
        case .mux:
            type = .mux
        case .ping(let x):
            type = .ping; body = be(x)
        case .pong(let x):
            type = .pong; body = be(x)
        case .registerSecret(let id, let name):
            type = .registerSecret; body = be(id) + string(name)
        case .visit(let name):
            type = .visit; body = string(name)
        case .visitAccepted:
            type = .visitAccepted
        case .serviceHello(let n):
            type = .serviceHello; body = n
        case .serviceChallenge(let n, let p):
            type = .serviceChallenge; body = n + p
        case .serviceProof(let p):
            type = .serviceProof; body = p
        case .serviceReady:
            type = .serviceReady
        }
        return be(UInt32(body.count + 1)) + [type.rawValue] + body
    }

    /// Reads one frame exactly (never past its end) and decodes it.
    static func read(from channel: AsyncDuplex) async throws -> Message {
        let header = try await channel.readExactly(4)
        let length = Int(UInt32(header[0]) << 24 | UInt32(header[1]) << 16 | UInt32(header[2]) << 8 | UInt32(header[3]))
        guard length >= 1 else { throw ChannelError.protocolViolation("empty frame") }
        guard length <= maxFrame else {
            throw ChannelError.protocolViolation("frame of \(length) bytes exceeds the limit of \(maxFrame)")
        }
        let frame = try await channel.readExactly(length)
        return try decode(type: frame[0], body: frame[1...])
    }

    static func decode(type raw: UInt8, body: ArraySlice<UInt8>) throws(ChannelError) -> Message {
        guard let type = TypeCode(rawValue: raw) else {
            throw ChannelError.protocolViolation("unknown frame type 0x\(String(raw, radix: 16))")
        }
        var r = Reader(bytes: body)
        let message: Message
        switch type {
        case .controlHello:
            message = .controlHello(version: try r.u16(), clientNonce: try r.bytes(nonceSize))
        case .challenge:
            message = .challenge(version: try r.u16(), serverNonce: try r.bytes(nonceSize), serverProof: try r.bytes(proofSize))
        case .clientAuth:
            message = .clientAuth(clientProof: try r.bytes(proofSize), poolSize: try r.u16(), heartbeatMillis: try r.u32(),
                                  muxChannels: try r.u8())
        case .welcome:
            message = .welcome(sessionID: try r.bytes(sessionIDSize))
        case .refused:
            message = .refused(reason: try r.string())
        case .registerService:
            let id = try r.u32()
            guard let kind = ServiceKind(rawValue: try r.u8()) else { throw ChannelError.protocolViolation("unknown service kind") }
            let bindHost = try r.string()
            let port = try r.u16()
            let flags = try r.u8()
            message = .registerService(ServiceRequest(id: id, kind: kind, bindHost: bindHost, port: port, compress: flags & 1 != 0))
        case .serviceAccepted:
            message = .serviceAccepted(id: try r.u32(), address: try r.string())
        case .serviceRefused:
            message = .serviceRefused(id: try r.u32(), reason: try r.string())
        case .openData:
            message = .openData(channelNonce: try r.bytes(channelNonceSize))
        case .dataHello:
            message = .dataHello(version: try r.u16(), sessionID: try r.bytes(sessionIDSize),
                                 channelNonce: try r.bytes(channelNonceSize), proof: try r.bytes(proofSize))
        case .connect:
            message = .connect(serviceID: try r.u32(), visitor: try r.string())
        case .mux:
            message = .mux
        case .ping:
            message = .ping(try r.u64())
        case .pong:
            message = .pong(try r.u64())
        case .registerSecret:
            message = .registerSecret(id: try r.u32(), name: try r.string())
        case .visit:
            message = .visit(name: try r.string())
        case .visitAccepted:
            message = .visitAccepted
        case .serviceHello:
            message = .serviceHello(visitorNonce: try r.bytes(nonceSize))
        case .serviceChallenge:
            message = .serviceChallenge(exposerNonce: try r.bytes(nonceSize), exposerProof: try r.bytes(proofSize))
        case .serviceProof:
            message = .serviceProof(visitorProof: try r.bytes(proofSize))
        case .serviceReady:
            message = .serviceReady
        }
        guard r.isAtEnd else { throw ChannelError.protocolViolation("trailing bytes in frame type 0x\(String(raw, radix: 16))") }
        return message
    }

    // MARK: multiplexed streams

    /// The payload of a mux `open` frame: which service the visitor wants, and who it is.
    static func encodeOpen(serviceID: UInt32, visitor: String) -> [UInt8] {
        be(serviceID) + string(visitor)
    }

    static func decodeOpen(_ payload: UnsafeRawBufferPointer) throws(ChannelError) -> (serviceID: UInt32, visitor: String) {
        var r = Reader(bytes: ArraySlice(payload))
        let id = try r.u32()
        let visitor = try r.string()
        guard r.isAtEnd else { throw ChannelError.protocolViolation("trailing bytes in a mux open frame") }
        return (id, visitor)
    }

    // MARK: primitives

    private static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
        withUnsafeBytes(of: v.bigEndian) { Array($0) }
    }

    private static func string(_ s: String) -> [UInt8] {
        let utf8 = Array(s.utf8.prefix(1024))
        return be(UInt16(utf8.count)) + utf8
    }

    private struct Reader {
        var bytes: ArraySlice<UInt8>
        var isAtEnd: Bool { bytes.isEmpty }

        mutating func bytes(_ n: Int) throws(ChannelError) -> [UInt8] {
            guard bytes.count >= n else { throw ChannelError.protocolViolation("truncated frame") }
            let out = Array(bytes.prefix(n))
            bytes = bytes.dropFirst(n)
            return out
        }

        mutating func int<T: FixedWidthInteger>(_: T.Type) throws(ChannelError) -> T {
            let raw = try bytes(MemoryLayout<T>.size)
            return raw.reduce(T(0)) { $0 << 8 | T($1) }
        }

        mutating func u8() throws(ChannelError) -> UInt8 { try int(UInt8.self) }
        mutating func u16() throws(ChannelError) -> UInt16 { try int(UInt16.self) }
        mutating func u32() throws(ChannelError) -> UInt32 { try int(UInt32.self) }
        mutating func u64() throws(ChannelError) -> UInt64 { try int(UInt64.self) }

        mutating func string() throws(ChannelError) -> String {
            let n = Int(try u16())
            guard let s = String(validating: try bytes(n), as: UTF8.self) else {
                throw ChannelError.protocolViolation("string is not UTF-8")
            }
            return s
        }
    }
}
