import Reactor
import Transfer

/// A running UDP association as its connection sees it: the relay address the reply
/// named, the counts for its close line, and when a datagram last passed (the idle
/// timeout). Its relay socket is on this host (`UDPAssociation`) or on another
/// (`RemoteRelay`).
///
/// Thread confinement: used on the loop of its connection.
protocol DatagramRelay: AnyObject {
    var relayAddress: SocketAddress { get }
    var lastActivity: UInt64 { get }
    var datagramsUp: UInt64 { get }
    var bytesUp: UInt64 { get }
    var datagramsDown: UInt64 { get }
    var bytesDown: UInt64 { get }
    var drops: [DatagramDrop: Int] { get }
    /// Releases the relay socket and the route; nothing is reported after it.
    func close()
}

extension UDPAssociation: DatagramRelay {}

/// Opens the relay of an association on another host: a reverse proxy's client reaches
/// it through the tunnel server, so the relay socket the client sends to must be there.
/// One opener serves the connections of one tunnel stream's proxy client.
///
/// Thread confinement: used on the loop of its connection.
protocol RemoteRelayOpener: AnyObject {
    /// A relay for the connection's client, which sends from `requested` (0: any port of
    /// its address). `ended` gets why, when the relay ends on its own (the tunnel lost
    /// it); never after `close()`.
    func open(requested port: UInt16, on loop: EventLoop, ended: @escaping (String) -> Void) async -> Result<DatagramRelay, ProxyFailure>
}
