import Reactor

/// How tunnel connections are protected.
public enum TunnelTransport: String, CaseIterable, Sendable {
    /// TLS 1.3: an external PSK from the token, or X.509 when the server has a certificate.
    case tls
    /// No encryption: only when both ends ask for it; data channels then splice.
    case plain
    /// Inside a WebSocket over plain HTTP (behind a TLS-terminating proxy); the client
    /// gets it from a ws:// server URL.
    case ws
    /// Inside a WebSocket over TLS (the server's --cert/--key); from a wss:// URL.
    case wss

    /// Whether the tunnel travels in a WebSocket.
    public var isWebSocket: Bool { self == .ws || self == .wss }
}

/// Allowed public ports, e.g. `20000-20100,8080`.
public struct PortRanges: Equatable, CustomStringConvertible, Sendable {
    public let ranges: [ClosedRange<UInt16>]

    public init(_ ranges: [ClosedRange<UInt16>]) { self.ranges = ranges }

    public static let unprivileged = PortRanges([1024...65535])

    public struct ParseError: Error, CustomStringConvertible {
        public let input: String
        public let reason: String
        public var description: String { "invalid port list '\(input)': \(reason)" }
    }

    public static func parse(_ text: String) throws(ParseError) -> PortRanges {
        var out: [ClosedRange<UInt16>] = []
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let item = String(part).trimmingWhitespace()
            let bounds = item.split(separator: "-", omittingEmptySubsequences: false)
            guard (1...2).contains(bounds.count), let lo = UInt16(bounds[0]), let hi = UInt16(bounds.last!), lo >= 1 else {
                throw ParseError(input: text, reason: "'\(item)' is not a port (1-65535) or a range like 20000-20100")
            }
            guard lo <= hi else { throw ParseError(input: text, reason: "range '\(item)' runs backwards") }
            out.append(lo...hi)
        }
        return PortRanges(out)
    }

    public func contains(_ port: UInt16) -> Bool { ranges.contains { $0.contains(port) } }

    /// True when every port the kernel hands out for port 0 is allowed.
    public var coversEphemeralRange: Bool { ranges.contains { $0.lowerBound <= 32768 && $0.upperBound >= 60999 } }

    public var description: String {
        ranges.map { $0.lowerBound == $0.upperBound ? "\($0.lowerBound)" : "\($0.lowerBound)-\($0.upperBound)" }.joined(separator: ",")
    }
}

/// One service a client exposes: `-R [udp:][BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT`, or a
/// secret service (`--secret NAME=LOCAL_HOST:LOCAL_PORT`) with no public port.
public struct ServiceSpec: Equatable, Sendable {
    /// What a service carries and how visitors reach it. One value, so that a secret UDP
    /// service cannot be written down.
    public enum Kind: String, CaseIterable, Sendable {
        /// TCP on a public port of the server.
        case tcp
        /// UDP on a public port: datagrams ride one data channel, framed with the visitor's address.
        case udp
        /// TCP with no public port, reached only by visitors proving `serviceToken`.
        case secret
        /// A SOCKS5 and HTTP proxy on a public port whose connections leave through this
        /// client (`-R proxy:[BIND:]REMOTE_PORT`): the server relays the visitor's bytes
        /// like a TCP service's, the client runs the proxy handshake and is the exit.
        case proxy
    }

    /// The service's id on the wire between client and server. Resolution numbers the
    /// services in the order of the merged config; it is stored rather than derived from
    /// the array position so that a reload can keep each service's id by its name.
    public var id: UInt32 = 0
    public var name: String
    public var kind: Kind
    /// The secret service's own token; nil means the client's token.
    public var serviceToken: String?
    /// Deflate the data channels of this service (not for secret services).
    public var compress = false
    /// Write a PROXY header naming the visitor to each local connection (TCP services).
    public var proxyProtocol: ProxyProtocolVersion?
    /// nil: the server's default bind address.
    public var bindHost: String?
    /// 0: the server picks a free allowed port.
    public var remotePort: UInt16
    public var localHost: String
    public var localPort: UInt16

    public init(name: String, kind: Kind = .tcp, bindHost: String?, remotePort: UInt16, localHost: String, localPort: UInt16) {
        self.name = name
        self.kind = kind
        self.bindHost = bindHost
        self.remotePort = remotePort
        self.localHost = localHost
        self.localPort = localPort
    }

    public struct ParseError: Error, CustomStringConvertible {
        public let input: String
        public let reason: String
        public var description: String { "invalid -R '\(input)': \(reason); expected [udp:][BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT" }
    }

    /// Parses ssh's -R form, optionally prefixed `udp:` or `tcp:`; IPv6 hosts go in brackets.
    public static func parse(_ text: String) throws(ParseError) -> ServiceSpec {
        if text.hasPrefix("proxy:") { return try parseProxy(text) }
        for kind in [Kind.udp, .tcp] where text.hasPrefix("\(kind.rawValue):") {
            do {
                var spec = try parse(String(text.dropFirst(kind.rawValue.count + 1)))
                spec.kind = kind
                spec.name = text
                return spec
            } catch {
                throw ParseError(input: text, reason: error.reason)
            }
        }
        var fields: [String] = []
        var current = ""
        var inBrackets = false
        for ch in text {
            switch ch {
            case "[" where !inBrackets: inBrackets = true
            case "]" where inBrackets: inBrackets = false
            case ":" where !inBrackets:
                fields.append(current)
                current = ""
            default: current.append(ch)
            }
        }
        fields.append(current)
        if inBrackets { throw ParseError(input: text, reason: "missing ']'") }
        guard fields.count == 3 || fields.count == 4 else {
            throw ParseError(input: text, reason: "expected 3 or 4 fields separated by ':'")
        }
        let bind: String? = fields.count == 4 ? (fields[0].isEmpty || fields[0] == "*" ? nil : fields[0]) : nil
        if let bind, !SocketAddressCheck.isNumeric(bind) {
            throw ParseError(input: text, reason: "BIND '\(bind)' is not a numeric IP address (the server binds it as given)")
        }
        let rest = fields.suffix(3).map { $0 }
        guard let remote = UInt16(rest[0]) else {
            throw ParseError(input: text, reason: "remote port '\(rest[0])' is not a number 0-65535")
        }
        guard !rest[1].isEmpty else { throw ParseError(input: text, reason: "empty LOCAL_HOST") }
        guard let local = UInt16(rest[2]), local > 0 else {
            throw ParseError(input: text, reason: "local port '\(rest[2])' is not a number 1-65535")
        }
        return ServiceSpec(name: text, bindHost: bind, remotePort: remote, localHost: rest[1], localPort: local)
    }

    /// `proxy:[BIND:]REMOTE_PORT`; IPv6 BIND in brackets.
    private static func parseProxy(_ text: String) throws(ParseError) -> ServiceSpec {
        let rest = String(text.dropFirst("proxy:".count))
        func fail(_ reason: String) -> ParseError {
            ParseError(input: text, reason: reason + "; a reverse proxy is proxy:[BIND:]REMOTE_PORT")
        }
        var bind: String?
        var portText = rest
        if rest.hasPrefix("["), let close = rest.firstIndex(of: "]") {
            bind = String(rest[rest.index(after: rest.startIndex)..<close])
            portText = String(rest[close...].dropFirst())
            guard portText.hasPrefix(":") else { throw fail("expected ':' after ']'") }
            portText.removeFirst()
        } else if let colon = rest.lastIndex(of: ":") {
            bind = String(rest[..<colon])
            portText = String(rest[rest.index(after: colon)...])
        }
        if bind == "" || bind == "*" { bind = nil }
        if let bind, !SocketAddressCheck.isNumeric(bind) {
            throw fail("BIND '\(bind)' is not a numeric IP address (the server binds it as given)")
        }
        guard let port = UInt16(portText) else { throw fail("remote port '\(portText)' is not a number 0-65535") }
        return ServiceSpec(name: text, kind: .proxy, bindHost: bind, remotePort: port, localHost: "", localPort: 0)
    }

    public struct SecretParseError: Error, CustomStringConvertible {
        public let input: String
        public var description: String { "invalid --secret '\(input)': expected NAME=LOCAL_HOST:LOCAL_PORT" }
    }

    /// Parses `NAME=LOCAL_HOST:LOCAL_PORT`.
    public static func parseSecret(_ text: String) throws(SecretParseError) -> ServiceSpec {
        guard let eq = text.firstIndex(of: "="), eq != text.startIndex else { throw SecretParseError(input: text) }
        let name = String(text[..<eq])
        guard name.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }),
              let local = try? HostPort.parse(String(text[text.index(after: eq)...])), local.port > 0 else {
            throw SecretParseError(input: text)
        }
        return ServiceSpec(name: name, kind: .secret, bindHost: nil, remotePort: 0,
                           localHost: local.host ?? "127.0.0.1", localPort: local.port)
    }

    /// `tcp` or `udp`, as ready lines and logs name the kind.
    public var kindName: String {
        switch kind {
        case .udp: return "udp"
        case .proxy: return "proxy"
        case .tcp, .secret: return "tcp"
        }
    }

    /// `127.0.0.1:22`, as the exposed line shows the local end; `proxy` for a reverse proxy.
    public var localDescription: String { kind == .proxy ? "proxy" : HostPort(host: localHost, port: localPort).description }
}

/// `culvert client --visit NAME -L [BIND:]PORT`: a local port whose connections reach a
/// secret service through the server.
public struct VisitSpec: Equatable, Sendable {
    public var name: String
    public var listen: HostPort
    /// The secret service's token; nil means the client's token.
    public var serviceToken: String?

    public init(name: String, listen: HostPort, serviceToken: String?) {
        self.name = name
        self.listen = listen
        self.serviceToken = serviceToken
    }
}

/// Heartbeat timing shared by both ends.
public struct Heartbeat: Sendable {
    public var interval: Duration = .seconds(5)
    /// Missed intervals after which the peer is declared dead.
    public var misses: Int = 3
    public init() {}
    public var deadAfter: Duration { interval * misses }
}

/// Everything `culvert server` needs, from flags or a config file.
public struct TunnelServerConfig: Sendable {
    public var listen: [HostPort] = [HostPort(host: nil, port: 7000)]
    public var token: String = ""
    public var transport: TunnelTransport = .tls
    /// The path, inner layer and keepalive with `--transport ws` or `wss`.
    public var webSocket = TunnelWebSocket()
    public var certFile: String?
    public var keyFile: String?
    public var allowPorts: PortRanges = .unprivileged
    /// Addresses services may bind; empty means any address the server has.
    public var bindAddresses: [String] = []
    public var maxClients: Int = 64
    public var maxServicesPerClient: Int = 32
    /// Connections in their handshake at once from addresses without a session; those
    /// with a session have a budget of the same size of their own (`UnauthenticatedBudget`).
    public var maxUnauthenticated: Int = 128
    /// Of those, the most from one IPv4 address or IPv6 /64: enough for several clients
    /// behind one NAT reconnecting together, few enough that one address cannot hold a
    /// real share of `maxUnauthenticated`.
    public var maxUnauthenticatedPerSource: Int = 8
    public var handshakeTimeout: Duration = .seconds(10)
    /// Visitors on exposed ports must start with a PROXY header (the server sits behind
    /// haproxy or a load balancer), read within `handshakeTimeout`; its source is the
    /// visitor's address from then on.
    public var acceptProxy = false
    /// How long a visitor waits for a data channel before it is closed.
    public var visitorTimeout: Duration = .seconds(10)
    public var heartbeat = Heartbeat()
    /// How long a client has to answer a ping when another client asks for a port or
    /// secret name it holds; silent, it is ended and the newcomer gets them. Long enough
    /// for a busy but live client on a slow link, short enough that a supervisor's
    /// restart of a hung client does not fail.
    public var handoverProbe: Duration = .seconds(2)
    public var drainTimeout: Duration = .seconds(30)
    /// Event loop threads; sessions, carriers and data channels spread over them.
    public var threads: Int = LoopGroup.coreCount
    /// Whether clients' `-D` streams leave here (`--allow-exit`).
    public var allowExit = false
    /// `--exit-allow` / `--exit-deny`: the exit's policy, over its default denial of
    /// loopback, link-local and this host's addresses.
    public var exitAllow: [ProxyRule] = []
    public var exitDeny: [ProxyRule] = []
    /// Time an exit gets to connect to a destination (all its addresses).
    public var exitConnectTimeout: Duration = .seconds(10)
    public init() {}
}

/// One of the client's servers: its address and, when it was given as a ws:// or wss://
/// URL, that URL, whose scheme is this server's transport and whose path its upgrade asks
/// for. A server given as HOST:PORT travels on the client's `transport`; so in one list
/// a WebSocket server behind a proxy can back up a direct TLS one, or the other way round.
///
/// Its `description` is how logs, `/status` and `/metrics` name it: a URL as the user
/// wrote it, so that two URLs on one HOST:PORT that differ in path stay apart (a URL
/// holds no credentials: `WebSocketURL.parse` refuses userinfo), else HOST:PORT.
public struct ServerEndpoint: Equatable, CustomStringConvertible, Sendable {
    public let address: HostPort
    public let webSocket: WebSocketURL?
    public let description: String

    public init(_ address: HostPort) {
        self.address = address
        webSocket = nil
        description = address.description
    }

    /// - Parameter written: the entry the URL was parsed from.
    public init(_ url: WebSocketURL, written: String) {
        address = url.target
        webSocket = url
        description = written
    }

    /// ws or wss for a URL; nil: the client's transport.
    public var transport: TunnelTransport? { webSocket.map { $0.secure ? .wss : .ws } }

    /// By what is reached, not how it is spelt: a reload that only respells a URL (case,
    /// the scheme's default port) changes nothing that runs.
    public static func == (a: ServerEndpoint, b: ServerEndpoint) -> Bool {
        a.address == b.address && a.webSocket == b.webSocket
    }
}

/// Everything `culvert client` needs, from flags or a config file.
public struct TunnelClientConfig: Sendable {
    /// The servers in order of preference: the client uses the first that answers and
    /// moves back to an earlier one when it answers again. Never empty.
    public var endpoints = [ServerEndpoint(HostPort(host: "127.0.0.1", port: 7000))]
    /// The servers' addresses; setting them makes each a HOST:PORT server.
    public var servers: [HostPort] {
        get { endpoints.map(\.address) }
        set { endpoints = newValue.map(ServerEndpoint.init) }
    }
    /// The preferred server; setting it makes it the only one.
    public var server: HostPort {
        get { servers[0] }
        set { servers = [newValue] }
    }
    public var token: String = ""
    public var transport: TunnelTransport = .tls
    /// The path, inner layer, keepalive and request details with a ws:// or wss:// server.
    public var webSocket = TunnelWebSocket()
    /// How the server is reached: straight, or through an HTTP or SOCKS5 proxy.
    public var proxy: ProxyRoute = .direct
    /// With `--proxy env`: the environment's proxy, which `reaching` applies to each
    /// server as NO_PROXY says (`proxy` is the preferred server's route).
    public var environmentProxy: EnvironmentProxy?
    public var caFile: String?
    /// SHA-256 of the server certificate's DER, pinned.
    public var fingerprint: [UInt8]?
    public var services: [ServiceSpec] = []
    /// Set when the client visits a secret service instead of exposing `services`.
    public var visit: VisitSpec?
    public var pool: Int = 2
    /// Data channels that carry TCP visitors as multiplexed streams; 0 opens a
    /// dedicated data channel per visitor (which splices on the plain transport).
    public var mux: Int = 1
    public var heartbeat = Heartbeat()
    public var handshakeTimeout: Duration = .seconds(10)
    public var connectTimeout: Duration = .seconds(5)
    public var reconnectInitial: Duration = .milliseconds(500)
    public var reconnectMax: Duration = .seconds(30)
    /// With several servers, how often the client, served by a later one, tries the
    /// earlier ones with a full handshake to move back.
    public var failbackInterval: Duration = .seconds(15)
    public var drainTimeout: Duration = .seconds(30)
    /// Event loop threads; sessions, carriers and data channels spread over them.
    public var threads: Int = LoopGroup.coreCount
    /// A UDP visitor's session to the local service ends after this long without traffic.
    public var udpIdleTimeout: Duration = .seconds(60)
    /// Sessions each UDP service may hold; nil: an equal share of `UDPSessionBudget`'s
    /// default, taken from the descriptors free at start; 0: no limit.
    public var udpMaxSessions: Int?
    /// Visitors each TCP or secret service relays at once; nil: `VisitorLimit`'s default,
    /// from the descriptors free at start; 0: no limit.
    public var maxVisitors: Int?
    /// `-D [BIND:]PORT`: proxies here whose connections leave through the server.
    public var dynamic: [HostPort] = []
    /// `--proxy-auth-file` (`proxy_auth_file`), read into `proxyCredentials`.
    public var proxyAuthFile: String?
    /// `--no-auth` (`no_auth`): unauthenticated proxies on non-loopback addresses on purpose.
    public var proxyNoAuth = false
    /// Users of the `-D` and `-R proxy:` proxies; nil: none needed.
    public var proxyCredentials: ProxyCredentials?
    /// `--exit-allow` / `--exit-deny`: where `-R proxy:` connections may go from here.
    public var exitAllow: [ProxyRule] = []
    public var exitDeny: [ProxyRule] = []
    public init() {}
}

extension TunnelClientConfig {
    /// When every server is a URL, the first one's transport and path are the client's
    /// (what a single-server connector, a visitor or a pipe, uses); each connector of a
    /// list takes its own server's from `reaching`.
    mutating func adoptWebSocketTransport() {
        guard let first = endpoints.first, endpoints.allSatisfy({ $0.webSocket != nil }) else { return }
        transport = first.transport ?? transport
        webSocket.path = first.webSocket?.path ?? webSocket.path
    }

    /// These settings with `endpoint` as the only server: what one server's connector
    /// needs (the transport checks that server's name; a URL brings its own transport
    /// and path).
    func reaching(_ endpoint: ServerEndpoint) -> TunnelClientConfig {
        var one = self
        one.endpoints = [endpoint]
        if let environmentProxy { one.proxy = environmentProxy.route(to: endpoint.address) }
        one.transport = endpoint.transport ?? transport
        one.webSocket.path = endpoint.webSocket?.path ?? webSocket.path
        return one
    }
}
