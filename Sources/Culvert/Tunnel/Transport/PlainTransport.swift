import Transfer

/// Frames on the bare TCP connection: nothing to negotiate or verify (the token proof
/// above still authenticates both ends), and data channels splice.
struct PlainTransport: Transport {
    /// Accepted sockets inherit TCP_NODELAY from the listener; dialed ones need it set.
    private let setNoDelay: Bool

    init(server config: TunnelServerConfig, keys: TokenKeys) { setNoDelay = false }
    init(client config: TunnelClientConfig, keys: TokenKeys) { setNoDelay = true }

    var warning: String? { "transport is plain: tunnel traffic is not encrypted" }

    func wrap(_ fd: Int32) -> (stream: Duplex, handshake: Handshake) {
        (TCPStream(fd: fd, noDelay: setNoDelay), { _ in })
    }
}
