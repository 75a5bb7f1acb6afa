import Reactor
import Transfer

/// How tunnel connections travel on the wire: what a connected socket becomes, and the
/// handshake (with every check of the peer) that must finish before the first frame.
/// The tunnel asks a transport nothing else, so a new one is one file beside
/// `PlainTransport` and `TLSTransport` plus its case in `TunnelTransport`.
///
/// A transport holds only settings fixed at start; each connection's state lives in the
/// stream it returns. Used on the loop that owns the socket.
protocol Transport: Sendable {
    /// Completes the transport's handshake through the channel that drives the stream,
    /// and verifies the peer; throws `FatalClientError` when retrying cannot help.
    typealias Handshake = (AsyncDuplex) async throws -> Void

    /// The server's end: listener-side settings (certificate and key, or the token's PSK).
    init(server config: TunnelServerConfig, keys: TokenKeys) throws
    /// The client's end: how it authenticates the server (PSK, `--ca`, `--fingerprint`).
    init(client config: TunnelClientConfig, keys: TokenKeys) throws

    /// Logged once at start when the transport leaves tunnel traffic unprotected.
    var warning: String? { get }

    /// Takes over a connected socket (accepted by the server or dialed by the client),
    /// closing it on a throw: the stream frames travel in and the handshake to run on it.
    func wrap(_ fd: Int32) throws -> (stream: Duplex, handshake: Handshake)
}

extension Transport {
    /// A connected socket as a channel on `loop`, its handshake still to run; the socket
    /// is closed on a throw.
    func channel(_ fd: Int32, on loop: EventLoop) throws -> (channel: AsyncDuplex, handshake: Handshake) {
        let (stream, handshake) = try wrap(fd)
        do {
            return (try AsyncDuplex(loop: loop, duplex: stream), handshake)
        } catch {
            stream.close(reset: true)
            throw error
        }
    }
}

extension TunnelTransport {
    /// The implementation of the transport the config names.
    var implementation: any Transport.Type {
        switch self {
        case .plain: return PlainTransport.self
        case .tls: return TLSTransport.self
        case .ws, .wss: return WebSocketTransport.self
        }
    }
}
