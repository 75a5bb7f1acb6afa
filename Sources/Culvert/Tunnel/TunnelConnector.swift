import Logging
import Reactor
import Transfer

/// How a client end reaches the server: connect, the transport's handshake (TLS with its
/// checks of the server, or nothing), and the mutual token proof. Shared by the exposing client and by visitors of secret services.
///
/// Thread confinement: used from tasks on `loop`.
final class TunnelConnector {
    let loop: EventLoop
    let server: HostPort
    /// The server as the user gave it (`ServerEndpoint.description`), for messages.
    private let serverName: String
    /// Straight to the server, or through a proxy (`--proxy`).
    private let proxy: ProxyRoute
    private let keys: TokenKeys
    let transport: any Transport
    /// The WebSocket settings when the transport is ws or wss.
    let webSocket: TunnelWebSocket?
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
        serverName = config.endpoints[0].description
        proxy = config.proxy
        keys = TokenKeys(token: config.token)
        transport = try config.transport.implementation.init(client: config, keys: keys)
        webSocket = config.transport.isWebSocket ? config.webSocket : nil
        connectTimeout = config.connectTimeout
        handshakeTimeout = config.handshakeTimeout
    }

    /// Forgets resolved addresses so the next connection resolves the name again.
    func forgetAddresses() { addresses = [] }

    /// Opens a connection to the server and runs the transport's handshake, which
    /// verifies the server (throwing `FatalClientError` when retrying cannot help).
    func openChannel() async throws -> AsyncDuplex {
        let (channel, handshake) = try transport.channel(try await connect(), on: loop)
        let timer = loop.schedule(after: handshakeTimeout) { channel.fail(.timedOut("transport handshake")) }
        defer { timer.cancel() }
        do {
            try await handshake(channel)
        } catch {
            channel.fail(.closed)
            throw error
        }
        return channel
    }

    /// A TCP connection to the first of the server's addresses that answers, or through
    /// the proxy to the server.
    private func connect() async throws -> Int32 {
        let dialed = proxy.address(for: server)
        if addresses.isEmpty {
            addresses = try await Resolver.resolve(host: dialed.host ?? "127.0.0.1", port: dialed.port, passive: false, on: loop)
        }
        let fd = try await Connector.connect(to: addresses, timeout: connectTimeout, on: loop)
        guard proxy != .direct else { return fd }
        return try await ProxyDialer.open(fd, through: proxy, to: server, timeout: handshakeTimeout, on: loop)
    }

    /// The mutual proof exchange on a fresh channel. Throws `FatalClientError` when the
    /// token is wrong (retrying cannot help); closes the channel on any failure, in good
    /// order when this end gives up (the server logs that as a refusal, not a fault).
    func authenticate(_ channel: AsyncDuplex, poolSize: Int, muxChannels: Int, heartbeat: Heartbeat) async throws -> Session {
        let timer = loop.schedule(after: handshakeTimeout) { channel.fail(.timedOut("handshake")) }
        defer { timer.cancel() }
        let clientNonce = TunnelCrypto.random(TunnelProtocol.nonceSize)
        do {
            channel.send(TunnelProtocol.encode(.controlHello(version: TunnelProtocol.version, clientNonce: clientNonce)))
            let serverNonce: [UInt8]
            let serverProof: [UInt8]
            switch try await TunnelProtocol.read(TunnelProtocol.ServerHandshake.self, from: channel) {
            case .challenge(_, let nonce, let proof): (serverNonce, serverProof) = (nonce, proof)
            case .refused(let refusal): throw Self.failure(refusal)
            case .welcome: throw ChannelError.protocolViolation("expected a challenge from the server")
            }
            let expected = TunnelProtocol.serverProof(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce)
            guard TunnelCrypto.constantTimeEqual(serverProof, expected) else {
                throw FatalClientError(message: "authentication failed: the server's token is not this client's; give both ends the same token (--token-file, CULVERT_TOKEN or token_file), and check that \(serverName) is the culvert server meant")
            }
            channel.send(TunnelProtocol.encode(TunnelProtocol.ClientAuth(
                clientProof: TunnelProtocol.clientProof(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce),
                poolSize: UInt16(poolSize), heartbeatMillis: UInt32(heartbeat.interval.nanoseconds / 1_000_000),
                muxChannels: UInt8(min(muxChannels, TunnelProtocol.maxMuxChannels)))))
            switch try await TunnelProtocol.read(TunnelProtocol.ServerHandshake.self, from: channel) {
            case .welcome(let id):
                return Session(id: id, key: TunnelProtocol.sessionKey(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce))
            case .refused(let refusal):
                throw Self.failure(refusal)
            case .challenge:
                throw ChannelError.protocolViolation("expected welcome from the server")
            }
        } catch {
            if error is FatalClientError { channel.close() } else { channel.fail(.closed) }
            throw error
        }
    }

    /// What a refusal of the handshake means for the client: a wrong token, another
    /// protocol version or another transport stays wrong however often it retries; the
    /// rest may pass later. Only a TLS or ws/wss server refuses our transport: a plain
    /// one refuses a TLS client's ClientHello, which `TLSTransport` recognises.
    private static func failure(_ refusal: TunnelProtocol.Refusal) -> Error {
        switch refusal.code {
        case .authFailed:
            return FatalClientError(message: "authentication failed")
        case .version:
            return FatalClientError(message: "server refused: \(refusal.reason)")
        case .transportMismatch:
            let webSocket = TransportMismatch.fromWebSocketServer(refusal.reason)
            return FatalClientError(message: webSocket ? TransportMismatch.serverUsesWebSocket : TransportMismatch.serverUsesTLS)
        case .serverFull, .tooManyServices, .duplicateService, .nameTaken, .bindNotAllowed, .portNotAllowed, .portInUse,
             .noFreePort, .listenFailed, .noSuchService, .wrongServiceToken, .localUnreachable, .exitNotAllowed:
            return ChannelError.protocolViolation("server refused: \(refusal.reason)")
        }
    }
}
