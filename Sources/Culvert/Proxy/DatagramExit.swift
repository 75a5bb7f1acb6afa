import Reactor
import Transfer

/// Where the datagrams of a SOCKS5 UDP association leave: the datagram counterpart of
/// `ProxyExit`. The association (the client's side: relay socket, SOCKS headers) opens
/// one route per association; a local exit sends from this host, a tunnel exit would
/// carry the datagrams in the tunnel's UDP framing.
protocol DatagramExit: AnyObject, Sendable {
    /// A route for one association on `loop`. `reply` gets each datagram that came back,
    /// with the address it came from; `drop` counts a datagram the route gave up on.
    /// Both are called on `loop`, and never after `close()`.
    func openRoute(on loop: EventLoop, reply: @escaping (SocketAddress, UnsafeRawBufferPointer) -> Void,
                   drop: @escaping (DatagramDrop) -> Void) -> DatagramRoute
    /// Why no association can go through this exit now (a tunnel exit the server
    /// refused); nil when routes can open. The request is then answered with it.
    var unavailable: ProxyFailure? { get }
}

extension DatagramExit {
    var unavailable: ProxyFailure? { nil }
}

/// The datagram path of one association through an exit.
///
/// Thread confinement: used on the loop it was opened on.
protocol DatagramRoute: AnyObject {
    /// Sends `payload` to `destination` (a name is resolved, and checked by the policy
    /// before and after); a datagram that cannot go is dropped and reported to `drop`.
    func send(_ payload: UnsafeRawBufferPointer, to destination: ProxyDestination)
    /// Releases the route's sockets; nothing is reported after it.
    func close()
}

/// Why a datagram of an association was dropped: the key it is counted under in the
/// association's close line.
enum DatagramDrop: String, CaseIterable, Sendable {
    /// FRAG ≠ 0: culvert does not reassemble fragments (RFC 1928 §7 allows dropping them).
    case fragment
    /// From an address other than the client's.
    case foreign
    /// Not a SOCKS UDP header.
    case malformed
    /// The policy refuses the destination (or every address its name resolves to).
    case denied
    /// The name did not resolve.
    case unresolved
    /// Too many lookups in flight for the association.
    case lookups
    /// Neither a socket to the destination nor room for one (descriptors, the cap).
    case sockets
    /// The socket's buffer was full.
    case full
    /// Too large once the SOCKS header is added or removed.
    case oversized
    /// The destination or the client answered with an error (ICMP unreachable).
    case unreachable
}
