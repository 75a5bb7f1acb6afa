#if canImport(Glibc)
import Glibc
#endif
import Reactor
import Transfer

/// How the client reaches its server: straight, or through a proxy (`--proxy`), for
/// every transport: the proxy only carries the TCP connection the transport runs on.
public enum ProxyRoute: Equatable, Sendable {
    case direct
    /// HTTP CONNECT, with Basic auth when credentials are given.
    case http(ProxyEndpoint)
    /// SOCKS5 CONNECT (RFC 1928), with username/password auth (RFC 1929) when given.
    case socks5(ProxyEndpoint)

    /// `http://[USER:PASS@]HOST:PORT` or `socks5://…`; `env` reads HTTPS_PROXY (or
    /// https_proxy) and NO_PROXY from `environment` for the connection to `server`.
    public static func parse(_ text: String, environment: [String: String], server: HostPort) throws(ConfigError) -> ProxyRoute {
        guard text == "env" else { return try parseURL(text, setting: "--proxy") }
        return try EnvironmentProxy(environment).route(to: server)
    }

    fileprivate static func parseURL(_ text: String, setting: String) throws(ConfigError) -> ProxyRoute {
        func bad(_ why: String) -> ConfigError {
            ConfigError(setting: "--proxy", "\(setting) '\(text)': \(why); write http://[USER:PASS@]HOST:PORT, socks5://[USER:PASS@]HOST:PORT or env")
        }
        let lower = text.lowercased()
        let isSocks = lower.hasPrefix("socks5://") || lower.hasPrefix("socks5h://")
        guard isSocks || lower.hasPrefix("http://") else { throw bad("the scheme must be http or socks5") }
        var rest = text.dropFirst(lower.hasPrefix("socks5h://") ? 10 : isSocks ? 9 : 7)
        while rest.hasSuffix("/") { rest = rest.dropLast() }
        var user: String?
        var password: String?
        if let at = rest.lastIndex(of: "@") {
            let credentials = rest[..<at]
            guard let colon = credentials.firstIndex(of: ":") else { throw bad("credentials are USER:PASS") }
            user = percentDecoded(credentials[..<colon])
            password = percentDecoded(credentials[credentials.index(after: colon)...])
            rest = rest[rest.index(after: at)...]
        }
        let address: HostPort
        do {
            address = try HostPort.parse(String(rest))
        } catch {
            throw bad(error.reason)
        }
        guard address.host != nil, address.port != 0 else { throw bad("give the proxy's HOST:PORT") }
        let endpoint = ProxyEndpoint(address: address, user: user, password: password)
        return isSocks ? .socks5(endpoint) : .http(endpoint)
    }

    /// NO_PROXY's rule as curl reads it: `*`, or names and domain suffixes separated by commas.
    static func isExempt(_ host: String, by list: String) -> Bool {
        let host = host.lowercased()
        for raw in list.split(separator: ",") {
            var entry = String(raw).trimmingWhitespace().lowercased()
            if entry == "*" { return true }
            if entry.hasPrefix("*") { entry.removeFirst() }
            if entry.hasPrefix(".") { entry.removeFirst() }
            if !entry.isEmpty && (host == entry || host.hasSuffix("." + entry)) { return true }
        }
        return false
    }

    private static func percentDecoded(_ text: Substring) -> String {
        var bytes: [UInt8] = []
        var i = text.utf8.startIndex
        let utf8 = text.utf8
        while i < utf8.endIndex {
            if utf8[i] == UInt8(ascii: "%"), let h = utf8.index(i, offsetBy: 2, limitedBy: utf8.endIndex), h < utf8.endIndex,
               let value = UInt8(String(decoding: utf8[utf8.index(after: i)...h], as: UTF8.self), radix: 16) {
                bytes.append(value)
                i = utf8.index(after: h)
            } else {
                bytes.append(utf8[i])
                i = utf8.index(after: i)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Where the client dials: the proxy, or the server itself.
    func address(for server: HostPort) -> HostPort {
        switch self {
        case .direct: return server
        case .http(let p), .socks5(let p): return p.address
        }
    }
}

/// `--proxy env`: HTTPS_PROXY (or https_proxy) for the servers NO_PROXY does not name,
/// kept whole so that each of several servers gets its own answer.
public struct EnvironmentProxy: Equatable, Sendable {
    let proxy: ProxyRoute
    let exempt: String

    public init(_ environment: [String: String]) throws(ConfigError) {
        if let url = environment["HTTPS_PROXY"] ?? environment["https_proxy"], !url.isEmpty {
            proxy = try ProxyRoute.parseURL(url, setting: "HTTPS_PROXY")
        } else {
            proxy = .direct
        }
        exempt = environment["NO_PROXY"] ?? environment["no_proxy"] ?? ""
    }

    func route(to server: HostPort) -> ProxyRoute {
        ProxyRoute.isExempt(server.host ?? "", by: exempt) ? .direct : proxy
    }
}

/// A proxy's address and the credentials it wants, if any.
public struct ProxyEndpoint: Equatable, Sendable, CustomStringConvertible {
    public let address: HostPort
    public let user: String?
    public let password: String?

    /// Without the credentials, for logs and errors.
    public var description: String { address.description }
}

/// A proxy's answer that retrying will not change (wrong credentials) is a
/// `FatalClientError`; the rest are this, and the client retries with backoff.
struct ProxyError: Error, CustomStringConvertible {
    let description: String
}

/// The dial step before the transport: asks the proxy on a connected socket to open a
/// connection to the server. The socket then carries the transport as if dialed straight.
enum ProxyDialer {
    /// Runs the proxy exchange on `fd` (connected to the proxy) within `timeout`;
    /// returns the socket, now leading to `target`, or closes it and throws.
    static func open(_ fd: Int32, through route: ProxyRoute, to target: HostPort, timeout: Duration, on loop: EventLoop) async throws -> Int32 {
        let channel: AsyncDuplex
        do {
            channel = try AsyncDuplex(loop: loop, duplex: TCPStream(fd: fd))
        } catch {
            Posix.close(fd)
            throw error
        }
        let timer = loop.schedule(after: timeout) { channel.fail(.timedOut("proxy exchange")) }
        defer { timer.cancel() }
        do {
            switch route {
            case .direct: break
            case .http(let proxy): try await httpConnect(channel, proxy: proxy, target: target)
            case .socks5(let proxy): try await socks5Connect(channel, proxy: proxy, target: target)
            }
        } catch {
            channel.fail(.closed)
            throw error
        }
        // The transport takes over a descriptor of its own; the channel's stream closes
        // the one it was given.
        let kept = dup(fd)
        _ = channel.detach()
        guard kept >= 0 else { throw SystemError("dup", errno: errno) }
        return kept
    }

    private static func hostText(_ target: HostPort) -> String {
        let host = target.host ?? "127.0.0.1"
        return host.contains(":") ? "[\(host)]:\(target.port)" : "\(host):\(target.port)"
    }

    // MARK: HTTP CONNECT

    private static func httpConnect(_ channel: AsyncDuplex, proxy: ProxyEndpoint, target: HostPort) async throws {
        let authority = hostText(target)
        var request = "CONNECT \(authority) HTTP/1.1\r\nHost: \(authority)\r\n"
        if let user = proxy.user {
            request += "Proxy-Authorization: Basic \(WebSocketHandshake.base64(Array("\(user):\(proxy.password ?? "")".utf8)))\r\n"
        }
        channel.send(Array((request + "\r\n").utf8))
        try await channel.flush()
        // Byte by byte: what follows the answer's head belongs to the transport.
        var head: [UInt8] = []
        while HTTPHead.end(in: head) == nil {
            guard head.count < WebSocketHandshake.maxHeadLength else { throw ProxyError(description: "the proxy \(proxy)'s answer to CONNECT is longer than \(WebSocketHandshake.maxHeadLength) bytes") }
            do {
                head += try await channel.read(max: 1)
            } catch ChannelError.eof {
                throw ProxyError(description: "the proxy \(proxy) closed the connection without answering CONNECT \(authority); is it an HTTP proxy?")
            }
        }
        guard let answer = HTTPHead.parse(head[...]), answer.startLine.0.hasPrefix("HTTP/1.") else {
            throw ProxyError(description: "the proxy \(proxy) did not answer CONNECT with HTTP; is it an HTTP proxy (for SOCKS use socks5://)?")
        }
        let status = Int(answer.startLine.1) ?? 0
        let said = "the proxy \(proxy) answered CONNECT \(authority) with \(answer.startLine.1) \(answer.startLine.2)"
        switch status {
        case 200..<300:
            return
        case 407 where proxy.user != nil:
            throw FatalClientError(message: "\(said): it refused the user name or password given in --proxy")
        case 407:
            throw FatalClientError(message: "\(said): it wants credentials; give them as --proxy http://USER:PASS@HOST:PORT")
        case 403:
            throw ProxyError(description: "\(said): its rules do not allow this destination")
        default:
            throw ProxyError(description: said)
        }
    }

    // MARK: SOCKS5

    private static func socks5Connect(_ channel: AsyncDuplex, proxy: ProxyEndpoint, target: HostPort) async throws {
        let noAuth: UInt8 = 0, userPassword: UInt8 = 2
        channel.send(proxy.user == nil ? [5, 1, noAuth] : [5, 2, noAuth, userPassword])
        let choice = try await read(channel, 2, proxy: proxy)
        guard choice[0] == 5 else { throw ProxyError(description: "the proxy \(proxy) does not speak SOCKS5; is it an HTTP proxy (use http://)?") }
        switch choice[1] {
        case noAuth:
            break
        case userPassword where proxy.user != nil:
            let user = Array((proxy.user ?? "").utf8.prefix(255)), password = Array((proxy.password ?? "").utf8.prefix(255))
            channel.send([1, UInt8(user.count)] + user + [UInt8(password.count)] + password)
            let status = try await read(channel, 2, proxy: proxy)
            guard status[1] == 0 else {
                throw FatalClientError(message: "the SOCKS5 proxy \(proxy) refused the user name or password given in --proxy")
            }
        default:
            throw FatalClientError(message: "the SOCKS5 proxy \(proxy) accepts none of our authentication methods; \(proxy.user == nil ? "give credentials as --proxy socks5://USER:PASS@HOST:PORT" : "it does not take a user name and password")")
        }
        channel.send([5, 1, 0] + address(target))
        let reply = try await read(channel, 4, proxy: proxy)
        guard reply[1] == 0 else {
            throw ProxyError(description: "the SOCKS5 proxy \(proxy) could not connect to \(hostText(target)): \(socksReason(reply[1]))")
        }
        let rest: Int
        switch reply[3] {
        case 1: rest = 4 + 2
        case 4: rest = 16 + 2
        case 3: rest = Int(try await read(channel, 1, proxy: proxy)[0]) + 2
        default: throw ProxyError(description: "the SOCKS5 proxy \(proxy) sent a malformed reply")
        }
        _ = try await read(channel, rest, proxy: proxy)
    }

    /// The target as SOCKS5 writes an address: IPv4, IPv6 or a name, then the port.
    private static func address(_ target: HostPort) -> [UInt8] {
        let host = target.host ?? "127.0.0.1"
        let port = [UInt8(target.port >> 8), UInt8(target.port & 0xff)]
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            return [1] + withUnsafeBytes(of: &v4) { Array($0) } + port
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, host, &v6) == 1 {
            return [4] + withUnsafeBytes(of: &v6) { Array($0) } + port
        }
        let name = Array(host.utf8.prefix(255))
        return [3, UInt8(name.count)] + name + port
    }

    private static func read(_ channel: AsyncDuplex, _ count: Int, proxy: ProxyEndpoint) async throws -> [UInt8] {
        try await channel.flush()
        do {
            return try await channel.readExactly(count)
        } catch ChannelError.eof {
            throw ProxyError(description: "the proxy \(proxy) closed the connection during the SOCKS5 exchange")
        }
    }

    private static func socksReason(_ code: UInt8) -> String {
        switch code {
        case 1: return "general failure"
        case 2: return "not allowed by its rules"
        case 3: return "network unreachable"
        case 4: return "host unreachable"
        case 5: return "connection refused"
        case 6: return "TTL expired"
        case 7: return "command not supported"
        case 8: return "address type not supported"
        default: return "reply code \(code)"
        }
    }
}
