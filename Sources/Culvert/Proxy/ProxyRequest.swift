import Transfer

/// Where a proxy client wants to go: an address it gave, or a name culvert resolves
/// (so `curl --socks5-hostname` and HTTP proxies resolve on the proxy's side).
public enum ProxyDestination: Equatable, Sendable, CustomStringConvertible {
    case address(SocketAddress)
    case name(String, port: UInt16)

    public var port: UInt16 {
        switch self {
        case .address(let a): return a.port
        case .name(_, let port): return port
        }
    }

    public var description: String {
        switch self {
        case .address(let a): return a.description
        case .name(let host, let port): return "\(host):\(port)"
        }
    }
}

/// What a finished SOCKS5 or HTTP handshake asks for: the seam between the front end
/// (which speaks the client's protocol) and an exit (`ProxyExit`) that fulfils it, by a
/// local dial today and through the tunnel later.
public struct ProxyRequest: Equatable, Sendable {
    /// The operation asked for.
    public enum Command: Equatable, Sendable {
        /// A TCP stream to the destination.
        case connect
    }

    public let command: Command
    public let destination: ProxyDestination

    public init(_ command: Command, to destination: ProxyDestination) {
        self.command = command
        self.destination = destination
    }
}
