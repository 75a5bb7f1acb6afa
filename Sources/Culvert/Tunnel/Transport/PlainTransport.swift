import Transfer

/// Frames on the bare TCP connection: nothing to negotiate or verify (the token proof
/// above still authenticates both ends), and data channels splice.
struct PlainTransport: Transport {
    /// Accepted sockets inherit TCP_NODELAY from the listener; dialed ones need it set.
    /// Only the server checks the peer's transport: the client speaks first, and a TLS
    /// server answers its frame with a plain `refused` frame (`TransportMismatch`).
    private let isServer: Bool

    init(server config: TunnelServerConfig, keys: TokenKeys) { isServer = true }
    init(client config: TunnelClientConfig, keys: TokenKeys) { isServer = false }

    var warning: String? { "transport is plain: tunnel traffic is not encrypted" }

    func wrap(_ fd: Int32) -> (stream: Duplex, handshake: Handshake) {
        guard isServer else { return (TCPStream(fd: fd, noDelay: true), { _ in }) }
        return (TCPStream(fd: fd, noDelay: false), Self.refuseTLS)
    }

    /// Waits for the client's first bytes and refuses a TLS ClientHello or a WebSocket upgrade.
    private static func refuseTLS(_ channel: AsyncDuplex) async throws {
        guard let head = try await TransportMismatch.firstBytes(of: channel) else { return }
        if TransportMismatch.isTLSRecord(head) { throw TransportMismatch.refuse(channel.duplex.fd, .clientSpeaksTLS) }
        if TransportMismatch.isHTTPRequest(head) { throw TransportMismatch.refuseWebSocket(channel.duplex.fd, serverTransport: "plain") }
    }
}
