#if canImport(Glibc)
import Glibc
#endif
import Transfer

/// The culvert tunnel wire protocol, version 4 (docs/PROTOCOL.md): the frames of the
/// control, data and visit channels, grouped by the reader that accepts them, their
/// encoding, and the proofs. The stream frames of a multiplexed data channel are coded
/// in Transfer/Mux.swift and the datagram frames of a UDP service's channel in
/// Transfer/DatagramChannel.swift; only the mux `open` payload is coded here.
///
/// Frame: u32 big-endian length of what follows (type byte + body), u8 type, body.
/// Integers are big-endian; strings and byte strings are u16 length + bytes.
enum TunnelProtocol {
    /// 2 added multiplexed data channels (`clientAuth` carries their count, `mux`);
    /// 3 raised the payload limit of their data frames to 256 KiB; 4 added refusal codes
    /// and, later, `goodbye` (docs/PROTOCOL.md: an older 4 peer ends on it as it would
    /// at the close that follows).
    static let version: UInt16 = 4
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

    /// What a registered service carries.
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

    // MARK: refusals

    /// Why a peer turned a request down, for the requester to act on (the text is for people).
    enum RefusalCode: UInt8, CaseIterable {
        /// The peers speak different versions. Sent as the absence of a code byte, so
        /// that a peer of any version can read it (see `Refusal`).
        case version = 0
        case authFailed = 1
        /// The server has as many clients as it accepts.
        case serverFull = 2
        case tooManyServices = 3
        /// The client registered a service id twice.
        case duplicateService = 4
        /// Another client registered a secret service of that name.
        case nameTaken = 5
        /// The bind address is not allowed, or not a numeric address.
        case bindNotAllowed = 6
        case portNotAllowed = 7
        case portInUse = 8
        /// No allowed port was free.
        case noFreePort = 9
        /// Binding or watching the port failed for another reason.
        case listenFailed = 10
        case noSuchService = 11
        case wrongServiceToken = 12
        case localUnreachable = 13
        /// One end uses `--transport plain`, the other TLS; sent in plain by the server.
        case transportMismatch = 14
        /// The server is not an exit (`--allow-exit` not given).
        case exitNotAllowed = 15
    }

    /// A refusal as it travels (in `refused` and `serviceRefused`): reason str, then the
    /// code u8. A version refusal has no code byte: it keeps the layout that versions
    /// before 4 send and read, so a peer of any version understands why it was refused.
    struct Refusal: Error, Equatable, CustomStringConvertible {
        let code: RefusalCode
        let reason: String

        init(_ code: RefusalCode, _ reason: String) {
            self.code = code
            self.reason = reason
        }

        var description: String { reason }

        fileprivate var body: [UInt8] {
            code == .version ? string(reason) : string(reason) + [code.rawValue]
        }

        fileprivate static func read(_ r: inout Reader) throws(ChannelError) -> Refusal {
            let reason = try r.string()
            if r.isAtEnd { return Refusal(.version, reason) }
            guard let code = RefusalCode(rawValue: try r.u8()), code != .version else {
                throw ChannelError.protocolViolation("unknown refusal code")
            }
            return Refusal(code, reason)
        }
    }

    // MARK: frames, one set per reader

    /// The frames one reader accepts, each set with its own type codes. A code means the
    /// same frame in every set that has it (ping, pong, refused), so a frame that
    /// reaches the wrong reader is rejected, never misread.
    protocol FrameSet: Equatable {
        associatedtype Code: RawRepresentable, CaseIterable where Code.RawValue == UInt8
        /// Who reads this set, for errors.
        static var reader: String { get }
        var encoded: (code: Code, body: [UInt8]) { get }
        static func decode(_ code: Code, _ body: inout Reader) throws(ChannelError) -> Self
    }

    /// client → server: the first frame of every connection.
    enum Hello: FrameSet {
        /// Opens a control channel. The version comes first in every version; when it is
        /// not ours the rest is not read (`clientNonce` is empty) and the server refuses.
        case controlHello(version: UInt16, clientNonce: [UInt8])
        /// Opens a data channel: the one-time proof for a nonce the server sent in
        /// `openData`. As above, a foreign version leaves the other fields empty.
        case dataHello(version: UInt16, sessionID: [UInt8], channelNonce: [UInt8], proof: [UInt8])

        enum Code: UInt8, CaseIterable { case controlHello = 0x01, dataHello = 0x21 }
        static let reader = "the first frame of a connection"

        var encoded: (code: Code, body: [UInt8]) {
            switch self {
            case .controlHello(let v, let n): return (.controlHello, be(v) + n)
            case .dataHello(let v, let id, let n, let p): return (.dataHello, be(v) + id + n + p)
            }
        }

        static func decode(_ code: Code, _ r: inout Reader) throws(ChannelError) -> Hello {
            let v = try r.u16()
            guard v == TunnelProtocol.version else {
                r.skipRest()
                switch code {
                case .controlHello: return .controlHello(version: v, clientNonce: [])
                case .dataHello: return .dataHello(version: v, sessionID: [], channelNonce: [], proof: [])
                }
            }
            switch code {
            case .controlHello:
                return .controlHello(version: v, clientNonce: try r.bytes(nonceSize))
            case .dataHello:
                return .dataHello(version: v, sessionID: try r.bytes(sessionIDSize),
                                  channelNonce: try r.bytes(channelNonceSize), proof: try r.bytes(proofSize))
            }
        }
    }

    /// server → client on a control channel, before the session exists.
    enum ServerHandshake: FrameSet {
        /// The server's nonce and its proof of the token.
        case challenge(version: UInt16, serverNonce: [UInt8], serverProof: [UInt8])
        /// Authenticated; the session's id.
        case welcome(sessionID: [UInt8])
        /// Then the connection closes.
        case refused(Refusal)

        enum Code: UInt8, CaseIterable { case challenge = 0x02, welcome = 0x04, refused = 0x05 }
        static let reader = "the client's handshake"

        var encoded: (code: Code, body: [UInt8]) {
            switch self {
            case .challenge(let v, let n, let p): return (.challenge, be(v) + n + p)
            case .welcome(let id): return (.welcome, id)
            case .refused(let refusal): return (.refused, refusal.body)
            }
        }

        static func decode(_ code: Code, _ r: inout Reader) throws(ChannelError) -> ServerHandshake {
            switch code {
            case .challenge:
                return .challenge(version: try r.u16(), serverNonce: try r.bytes(nonceSize), serverProof: try r.bytes(proofSize))
            case .welcome: return .welcome(sessionID: try r.bytes(sessionIDSize))
            case .refused: return .refused(try Refusal.read(&r))
            }
        }
    }

    /// client → server, the answer to the challenge: the client's proof, its pool size,
    /// heartbeat interval (ms) and how many multiplexed data channels carry its TCP
    /// visitors (0: a dedicated data channel per visitor).
    struct ClientAuth: FrameSet {
        var clientProof: [UInt8]
        var poolSize: UInt16
        var heartbeatMillis: UInt32
        var muxChannels: UInt8

        enum Code: UInt8, CaseIterable { case clientAuth = 0x03 }
        static let reader = "the server's handshake"

        var encoded: (code: Code, body: [UInt8]) {
            (.clientAuth, clientProof + be(poolSize) + be(heartbeatMillis) + [muxChannels])
        }

        static func decode(_ code: Code, _ r: inout Reader) throws(ChannelError) -> ClientAuth {
            switch code {
            case .clientAuth:
                return ClientAuth(clientProof: try r.bytes(proofSize), poolSize: try r.u16(), heartbeatMillis: try r.u32(),
                                  muxChannels: try r.u8())
            }
        }
    }

    /// client → server on an authenticated control channel.
    enum ClientControl: FrameSet {
        case registerService(ServiceRequest)
        /// A secret service, reachable only by visitors who know its token.
        case registerSecret(id: UInt32, name: String)
        /// Instead of registering: this connection is a visitor for the named secret
        /// service; what follows is a visit channel.
        case visit(name: String)
        /// A reload removed the service: close its port or release its name; relays
        /// already running go on. No answer.
        case unregisterService(id: UInt32)
        case ping(UInt64)
        case pong(UInt64)
        /// The client is leaving on purpose (stopped, or exiting); the server ends the
        /// session and closes the control channel, which tells the client it may go.
        case goodbye(reason: String)
        /// The client wants to open exit streams on its carriers (`-D`); answered with
        /// `exitAccepted` or `exitRefused`. A server that predates exits closes the
        /// control channel on it, which the client reports as such.
        case useExit

        enum Code: UInt8, CaseIterable {
            case registerService = 0x10, registerSecret = 0x13, visit = 0x14, unregisterService = 0x16, useExit = 0x17,
                 ping = 0x30, pong = 0x31, goodbye = 0x32
        }
        static let reader = "the server's control channel"

        var encoded: (code: Code, body: [UInt8]) {
            switch self {
            case .registerService(let s):
                return (.registerService, be(s.id) + [s.kind.rawValue] + string(s.bindHost) + be(s.port) + [s.compress ? 1 : 0])
            case .registerSecret(let id, let name): return (.registerSecret, be(id) + string(name))
            case .visit(let name): return (.visit, string(name))
            case .unregisterService(let id): return (.unregisterService, be(id))
            case .ping(let x): return (.ping, be(x))
            case .pong(let x): return (.pong, be(x))
            case .goodbye(let reason): return (.goodbye, string(reason))
            case .useExit: return (.useExit, [])
            }
        }

        static func decode(_ code: Code, _ r: inout Reader) throws(ChannelError) -> ClientControl {
            switch code {
            case .registerService:
                let id = try r.u32()
                guard let kind = ServiceKind(rawValue: try r.u8()) else { throw ChannelError.protocolViolation("unknown service kind") }
                let bindHost = try r.string()
                let port = try r.u16()
                let flags = try r.u8()
                return .registerService(ServiceRequest(id: id, kind: kind, bindHost: bindHost, port: port, compress: flags & 1 != 0))
            case .registerSecret: return .registerSecret(id: try r.u32(), name: try r.string())
            case .visit: return .visit(name: try r.string())
            case .unregisterService: return .unregisterService(id: try r.u32())
            case .ping: return .ping(try r.u64())
            case .pong: return .pong(try r.u64())
            case .goodbye: return .goodbye(reason: try r.string())
            case .useExit: return .useExit
            }
        }
    }

    /// server → client on an authenticated control channel.
    enum ServerControl: FrameSet {
        case serviceAccepted(id: UInt32, address: String)
        case serviceRefused(id: UInt32, Refusal)
        /// Open one data channel with this nonce.
        case openData(channelNonce: [UInt8])
        case ping(UInt64)
        case pong(UInt64)
        /// The server is shutting down; the client ends the session, closes the control
        /// channel (which tells the server it may go) and reconnects as after any end.
        case goodbye(reason: String)
        /// The answer to `useExit`: the client may open exit streams on its carriers.
        case exitAccepted
        /// The answer to `useExit`: this server is no exit; the client answers its
        /// proxy clients itself and opens no exit streams.
        case exitRefused(Refusal)

        enum Code: UInt8, CaseIterable {
            case serviceAccepted = 0x11, serviceRefused = 0x12, exitAccepted = 0x18, exitRefused = 0x19, openData = 0x20,
                 ping = 0x30, pong = 0x31, goodbye = 0x32
        }
        static let reader = "the client's control channel"

        var encoded: (code: Code, body: [UInt8]) {
            switch self {
            case .serviceAccepted(let id, let address): return (.serviceAccepted, be(id) + string(address))
            case .serviceRefused(let id, let refusal): return (.serviceRefused, be(id) + refusal.body)
            case .openData(let n): return (.openData, n)
            case .ping(let x): return (.ping, be(x))
            case .pong(let x): return (.pong, be(x))
            case .goodbye(let reason): return (.goodbye, string(reason))
            case .exitAccepted: return (.exitAccepted, [])
            case .exitRefused(let refusal): return (.exitRefused, refusal.body)
            }
        }

        static func decode(_ code: Code, _ r: inout Reader) throws(ChannelError) -> ServerControl {
            switch code {
            case .serviceAccepted: return .serviceAccepted(id: try r.u32(), address: try r.string())
            case .serviceRefused: return .serviceRefused(id: try r.u32(), try Refusal.read(&r))
            case .openData: return .openData(channelNonce: try r.bytes(channelNonceSize))
            case .ping: return .ping(try r.u64())
            case .pong: return .pong(try r.u64())
            case .goodbye: return .goodbye(reason: try r.string())
            case .exitAccepted: return .exitAccepted
            case .exitRefused: return .exitRefused(try Refusal.read(&r))
            }
        }
    }

    /// server → client, the first frame on a data channel, once the server uses it.
    enum DataCommand: FrameSet {
        /// A visitor for this service; raw bytes follow.
        case connect(serviceID: UInt32, visitor: String)
        /// The channel carries multiplexed streams from now on (Transfer/Mux.swift
        /// frames); each stream opens with `encodeOpen`'s payload.
        case mux

        enum Code: UInt8, CaseIterable { case connect = 0x22, mux = 0x23 }
        static let reader = "a data channel"

        var encoded: (code: Code, body: [UInt8]) {
            switch self {
            case .connect(let id, let visitor): return (.connect, be(id) + string(visitor))
            case .mux: return (.mux, [])
            }
        }

        static func decode(_ code: Code, _ r: inout Reader) throws(ChannelError) -> DataCommand {
            switch code {
            case .connect: return .connect(serviceID: try r.u32(), visitor: try r.string())
            case .mux: return .mux
            }
        }
    }

    /// visitor → exposing client on a visit channel, end to end through the server.
    enum VisitorFrame: FrameSet {
        case serviceHello(visitorNonce: [UInt8])
        /// The visitor's proof of the service token.
        case serviceProof(visitorProof: [UInt8])

        enum Code: UInt8, CaseIterable { case serviceHello = 0x40, serviceProof = 0x42 }
        static let reader = "the exposing client"

        var encoded: (code: Code, body: [UInt8]) {
            switch self {
            case .serviceHello(let n): return (.serviceHello, n)
            case .serviceProof(let p): return (.serviceProof, p)
            }
        }

        static func decode(_ code: Code, _ r: inout Reader) throws(ChannelError) -> VisitorFrame {
            switch code {
            case .serviceHello: return .serviceHello(visitorNonce: try r.bytes(nonceSize))
            case .serviceProof: return .serviceProof(visitorProof: try r.bytes(proofSize))
            }
        }
    }

    /// → visitor on a visit channel: the server's answer to `visit`, then the exposing
    /// client's frames.
    enum VisitAnswer: FrameSet {
        /// server: paired; what follows is the exposing client's end.
        case visitAccepted
        /// exposer: its nonce and its proof of the service token.
        case serviceChallenge(exposerNonce: [UInt8], exposerProof: [UInt8])
        /// exposer: accepted and connected to the local service; raw bytes follow.
        case serviceReady
        /// server or exposer; then the connection closes.
        case refused(Refusal)

        enum Code: UInt8, CaseIterable { case visitAccepted = 0x15, serviceChallenge = 0x41, serviceReady = 0x43, refused = 0x05 }
        static let reader = "the visitor"

        var encoded: (code: Code, body: [UInt8]) {
            switch self {
            case .visitAccepted: return (.visitAccepted, [])
            case .serviceChallenge(let n, let p): return (.serviceChallenge, n + p)
            case .serviceReady: return (.serviceReady, [])
            case .refused(let refusal): return (.refused, refusal.body)
            }
        }

        static func decode(_ code: Code, _ r: inout Reader) throws(ChannelError) -> VisitAnswer {
            switch code {
            case .visitAccepted: return .visitAccepted
            case .serviceChallenge: return .serviceChallenge(exposerNonce: try r.bytes(nonceSize), exposerProof: try r.bytes(proofSize))
            case .serviceReady: return .serviceReady
            case .refused: return .refused(try Refusal.read(&r))
            }
        }
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

    // One overload per set, so that a call site names just the frame (`.welcome(...)`)
    // unless two sets share it (ping, pong, refused).
    static func encode(_ frame: Hello) -> [UInt8] { frame.wire }
    static func encode(_ frame: ServerHandshake) -> [UInt8] { frame.wire }
    static func encode(_ frame: ClientAuth) -> [UInt8] { frame.wire }
    static func encode(_ frame: ClientControl) -> [UInt8] { frame.wire }
    static func encode(_ frame: ServerControl) -> [UInt8] { frame.wire }
    static func encode(_ frame: DataCommand) -> [UInt8] { frame.wire }
    static func encode(_ frame: VisitorFrame) -> [UInt8] { frame.wire }
    static func encode(_ frame: VisitAnswer) -> [UInt8] { frame.wire }

    /// Reads one frame exactly (never past its end) and decodes it as one of `set`.
    static func read<F: FrameSet>(_ set: F.Type, from channel: AsyncDuplex) async throws -> F {
        let header = try await channel.readExactly(4)
        let length = Int(UInt32(header[0]) << 24 | UInt32(header[1]) << 16 | UInt32(header[2]) << 8 | UInt32(header[3]))
        guard length >= 1 else { throw ChannelError.protocolViolation("empty frame") }
        guard length <= maxFrame else {
            throw ChannelError.protocolViolation("frame of \(length) bytes exceeds the limit of \(maxFrame)")
        }
        let frame = try await channel.readExactly(length)
        return try decode(set, type: frame[0], body: frame[1...])
    }

    static func decode<F: FrameSet>(_ set: F.Type, type raw: UInt8, body: ArraySlice<UInt8>) throws(ChannelError) -> F {
        guard let code = F.Code(rawValue: raw) else {
            throw ChannelError.protocolViolation("unexpected frame type 0x\(String(raw, radix: 16)) for \(F.reader)")
        }
        var r = Reader(bytes: body)
        let frame = try F.decode(code, &r)
        guard r.isAtEnd else { throw ChannelError.protocolViolation("trailing bytes in frame type 0x\(String(raw, radix: 16))") }
        return frame
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

    /// The payload of a mux `open` frame from the client (an exit stream, `-D`): where
    /// the exit connects, as SOCKS5 writes it: type u8 (1 IPv4, 3 name, 4 IPv6), the
    /// address (4 bytes, str, 16 bytes), port u16.
    static func encodeExitOpen(_ destination: ProxyDestination) -> [UInt8] {
        switch destination {
        case .name(let host, let port):
            return [3] + string(host) + be(port)
        case .address(let address):
            let bytes = ProxyRule.addressBytes(address)
            return [bytes.count == 4 ? 1 : 4] + bytes + be(address.port)
        }
    }

    static func decodeExitOpen(_ payload: UnsafeRawBufferPointer) throws(ChannelError) -> ProxyDestination {
        var r = Reader(bytes: ArraySlice(payload))
        let destination: ProxyDestination
        switch try r.u8() {
        case 1:
            let bytes = try r.bytes(4)
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            withUnsafeMutableBytes(of: &a.sin_addr) { $0.copyBytes(from: bytes) }
            destination = .address(.v4(a).withPort(try r.u16()))
        case 3:
            let host = try r.string()
            let port = try r.u16()
            guard !host.isEmpty, Socks5.hostName(ArraySlice(host.utf8)) != nil else {
                throw ChannelError.protocolViolation("exit stream names no valid host")
            }
            destination = .name(host, port: port)
        case 4:
            let bytes = try r.bytes(16)
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            withUnsafeMutableBytes(of: &a.sin6_addr) { $0.copyBytes(from: bytes) }
            destination = .address(.v6(a).withPort(try r.u16()))
        case let other:
            throw ChannelError.protocolViolation("unknown address type \(other) in an exit stream")
        }
        guard r.isAtEnd else { throw ChannelError.protocolViolation("trailing bytes in an exit stream's open frame") }
        return destination
    }

    // MARK: relay streams (see ReverseDatagrams.swift)
    static let relayKind: UInt8 = 0x11

    /// What a relay stream asks the server for.
    struct RelayRequest: Equatable {
        let visitor: String
        let port: UInt16
        let bindHost: String
    }

    static func encodeRelayOpen(_ request: RelayRequest) -> [UInt8] {
        [relayKind] + string(request.visitor) + be(request.port) + string(request.bindHost)
    }

    /// nil when the payload is another kind of exit stream.
    static func decodeRelayOpen(_ payload: UnsafeRawBufferPointer) throws(ChannelError) -> RelayRequest? {
        guard payload.first == relayKind else { return nil }
        var r = Reader(bytes: ArraySlice(payload.dropFirst()))
        let request = RelayRequest(visitor: try r.string(), port: try r.u16(), bindHost: try r.string())
        guard r.isAtEnd else { throw ChannelError.protocolViolation("trailing bytes in a relay stream's open frame") }
        return request
    }

    /// The first bytes the exit sends on an exit stream: status u8, reason str. After
    /// `connected` the stream carries the destination's bytes; after any other status
    /// the exit ends the stream.
    enum ExitStatus: UInt8 {
        case connected = 0
        case notAllowed = 1
        /// The server is no exit (a client that opened one anyway, or a race with a reload).
        case exitsDisabled = 2
        case networkUnreachable = 3
        case hostUnreachable = 4
        case nameNotFound = 5
        case connectionRefused = 6
        case timedOut = 7
        case failed = 8
    }

    static func encodeExitReply(_ status: ExitStatus, reason: String = "") -> [UInt8] {
        [status.rawValue] + string(reason)
    }

    /// Reads the exit's reply off an exit stream.
    static func readExitReply(from channel: AsyncDuplex) async throws -> (ExitStatus, String) {
        let head = try await channel.readExactly(3)
        guard let status = ExitStatus(rawValue: head[0]) else {
            throw ChannelError.protocolViolation("unknown exit status \(head[0])")
        }
        let length = Int(head[1]) << 8 | Int(head[2])
        let text = length == 0 ? [] : try await channel.readExactly(length)
        return (status, String(decoding: text, as: UTF8.self))
    }

    // MARK: primitives

    fileprivate static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
        withUnsafeBytes(of: v.bigEndian) { Array($0) }
    }

    fileprivate static func string(_ s: String) -> [UInt8] {
        let utf8 = Array(s.utf8.prefix(1024))
        return be(UInt16(utf8.count)) + utf8
    }

    /// Takes a frame's body apart, field by field; every read checks the length.
    struct Reader {
        fileprivate var bytes: ArraySlice<UInt8>
        var isAtEnd: Bool { bytes.isEmpty }

        mutating func bytes(_ n: Int) throws(ChannelError) -> [UInt8] {
            guard bytes.count >= n else { throw ChannelError.protocolViolation("truncated frame") }
            let out = Array(bytes.prefix(n))
            bytes = bytes.dropFirst(n)
            return out
        }

        /// Drops what is left: the body of a frame whose layout is another version's.
        mutating func skipRest() { bytes = [] }

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

extension TunnelProtocol.FrameSet {
    /// The whole frame: length, type code, body.
    var wire: [UInt8] {
        let (code, body) = encoded
        return TunnelProtocol.be(UInt32(body.count + 1)) + [code.rawValue] + body
    }
}
