#if canImport(Glibc)
import Glibc
#endif
import Transfer

/// The request targets an HTTP proxy acts on: the authority of `CONNECT host:port` and
/// the absolute form `http://host[:port]/path` of a forwarded request.
public enum HTTPTarget {
    /// `host:port` or `[v6]:port`; without a port, `defaultPort` (nil: a port is required).
    public static func authority(_ text: Substring, defaultPort: UInt16?) -> ProxyDestination? {
        let host: Substring
        var port = defaultPort
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":"), let p = UInt16(rest.dropFirst()) else { return nil }
                port = p
            }
            guard SocketAddress(numericHost: String(host), port: 0)?.family == AF_INET6 else { return nil }
        } else if let colon = text.lastIndex(of: ":") {
            host = text[..<colon]
            guard let p = UInt16(text[text.index(after: colon)...]) else { return nil }
            port = p
        } else {
            host = text
        }
        guard let port, port != 0, !host.isEmpty else { return nil }
        if let address = SocketAddress(numericHost: String(host), port: port) { return .address(address) }
        guard let name = Socks5.hostName(ArraySlice(host.utf8)) else { return nil }
        return .name(name, port: port)
    }

    /// An absolute-form target: where to connect, and the origin-form path to send there.
    /// Only `http:` (an `https:` URL is the client's to tunnel with CONNECT).
    public static func absolute(_ target: String) -> (destination: ProxyDestination, path: String)? {
        guard target.count > 7, target.prefix(7).lowercased() == "http://" else { return nil }
        let rest = target.dropFirst(7)
        let end = rest.firstIndex(where: { $0 == "/" || $0 == "?" || $0 == "#" }) ?? rest.endIndex
        var hostPart = rest[..<end]
        // user:password@ in a URL is not for the origin's connection.
        if let at = hostPart.lastIndex(of: "@") { hostPart = hostPart[hostPart.index(after: at)...] }
        guard let destination = authority(hostPart, defaultPort: 80) else { return nil }
        var path = String(rest[end...].prefix { $0 != "#" })
        if path.isEmpty { path = "/" } else if path.hasPrefix("?") { path = "/" + path }
        return (destination, path)
    }
}
