import Reactor
import Transfer

/// Where proxied connections leave: given a request's destination, it opens a stream
/// there or says why not. The front ends (SOCKS5, HTTP) end in a call to an exit, so the
/// same front ends serve a local exit (`LocalExit`, dialing from this host) and one at
/// the far end of a tunnel.
protocol ProxyExit: AnyObject, Sendable {
    /// Opens a TCP stream to `destination` on `loop`; cancelling the calling task gives
    /// up (a drain deadline).
    func connect(to destination: ProxyDestination, on loop: EventLoop) async -> Result<ProxyExitStream, ProxyFailure>
}

/// A stream an exit opened: not registered with any loop, ready for a relay.
struct ProxyExitStream {
    let stream: Duplex
    /// The address reached, for the reply (SOCKS5 BND.ADDR) and the log.
    let remote: SocketAddress?
    /// The local address of the exit's socket.
    let local: SocketAddress?
}
