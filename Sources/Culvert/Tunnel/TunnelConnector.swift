import Logging
import Reactor
import Transfer

/// How a client end reaches the server: connect, TLS (with fingerprint pinning), and the
/// mutual token proof. Shared by the exposing client and by visitors of secret services.
///
/// Thread confinement: used from tasks on `loop`.
final class TunnelConnector {
    let loop: EventLoop
    let server: HostPort
    private let keys: TokenKeys
    private let tls: TLSContext?
    /// True when TLS authenticates the server by the token's PSK (no --ca, no --fingerprint).
    private let expectsPSK: Bool
    private let caFile: String?
    private let fingerprint: [UInt8]?
    let connectTimeout: Duration
    let handshakeTimeout: Duration
    private var addresses: [SocketAddress] = []

    /// An authenticated control session's identity.
    struct Session {
        let id: [UInt8]
        let key: [UInt8]
    }

    init(loop: EventLoop, config: TunnelClientConfig) throws {
        self.loop = loop
        server = config.server
        keys = TokenKeys(token: config.token)
        caFile = config.caFile
        fingerprint = config.fingerprint
        connectTimeout = config.connectTimeout
        handshakeTimeout = config.handshakeTimeout
        expectsPSK = config.transport == .tls && config.caFile == nil && config.fingerprint == nil
        switch config.transport {
        case .plain: tls = nil
        case .tls:
            if config.caFile != nil || config.fingerprint != nil {
                tls = try TLSContext.client(caFile: config.caFile)
            } else {
                tls = try TLSContext.psk(key: keys.tlsPSK, server: false)
            }
        }
    }

    /// Forgets resolved addresses so the next connection resolves the name again.
    func forgetAddresses() { addresses = [] }

    /// Opens a connection to the server, TLS included, and checks a pinned fingerprint.
    func openChannel() async throws -> AsyncDuplex {
        if addresses.isEmpty {
            addresses = try await Resolver.resolve(host: server.host ?? "127.0.0.1", port: server.port, passive: false, on: loop)
        }
        let fd = try await Connector.connect(to: addresses, timeout: connectTimeout, on: loop)
        let stream: Duplex
        do {
            stream = try tls.map { try TLSStream(fd: fd, context: $0, serverName: caFile == nil ? nil : server.host) } ?? TCPStream(fd: fd)
        } catch {
            Posix.close(fd)
            throw error
        }
        let channel = try AsyncDuplex(loop: loop, duplex: stream)
        let timer = loop.schedule(after: handshakeTimeout) { channel.fail(.timedOut("TLS handshake")) }
        defer { timer.cancel() }
        do {
            try await channel.handshake()
        } catch let e as TLSError where e.isRejection {
            channel.fail(.closed)
            throw FatalClientError(message: "authentication failed: the server rejected the TLS handshake (\(e.message)); check the token, --ca or --fingerprint")
        }
        if expectsPSK, let tlsStream = stream as? TLSStream, !tlsStream.usedPSK {
            channel.fail(.closed)
            throw FatalClientError(message: "authentication failed: the server presented a certificate instead of using the token; give --ca FILE or --fingerprint sha256:HEX to verify it")
        }
        if let pinned = fingerprint, let tlsStream = stream as? TLSStream {
            guard let actual = tlsStream.peerFingerprint(), TunnelCrypto.constantTimeEqual(actual, pinned) else {
                channel.fail(.closed)
                throw FatalClientError(message: "authentication failed: server certificate fingerprint does not match --fingerprint")
            }
        }
        return channel
    }

    /// The mutual proof exchange on a fresh channel. Throws `FatalClientError` when the
    /// token is wrong (retrying cannot help); closes the channel on any failure.
    func authenticate(_ channel: AsyncDuplex, poolSize: Int, muxChannels: Int, heartbeat: Heartbeat) async throws -> Session {
        let timer = loop.schedule(after: handshakeTimeout) { channel.fail(.timedOut("handshake")) }
        defer { timer.cancel() }
        let clientNonce = TunnelCrypto.random(TunnelProtocol.nonceSize)
        do {
            channel.send(TunnelProtocol.encode(.controlHello(version: TunnelProtocol.version, clientNonce: clientNonce)))
            let challenge = try await TunnelProtocol.read(from: channel)
            if case .refused(let reason) = challenge { throw FatalClientError(message: "server refused: \(reason)") }
            guard case .challenge(_, let serverNonce, let serverProof) = challenge else {
                throw ChannelError.protocolViolation("expected a challenge from the server")
            }
            let expected = TunnelProtocol.serverProof(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce)
            guard TunnelCrypto.constantTimeEqual(serverProof, expected) else {
                throw FatalClientError(message: "authentication failed: the server could not prove it knows the token")
            }
            channel.send(TunnelProtocol.encode(.clientAuth(
                clientProof: TunnelProtocol.clientProof(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce),
                poolSize: UInt16(poolSize), heartbeatMillis: UInt32(heartbeat.interval.nanoseconds / 1_000_000),
                muxChannels: UInt8(min(muxChannels, TunnelProtocol.maxMuxChannels)))))
            switch try await TunnelProtocol.read(from: channel) {
            case .welcome(let id):
                return Session(id: id, key: TunnelProtocol.sessionKey(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce))
            case .refused(let reason):
                if reason == "authentication failed" { throw FatalClientError(message: "authentication failed") }
                throw ChannelError.protocolViolation("server refused: \(reason)")
            default:
                throw ChannelError.protocolViolation("expected welcome from the server")
            }
        } catch {
            channel.fail(.closed)
            throw error
        }
    }
}
