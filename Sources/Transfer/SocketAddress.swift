#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// An IPv4 or IPv6 socket address.
public enum SocketAddress: Equatable, Hashable, CustomStringConvertible, Sendable {
    case v4(sockaddr_in)
    case v6(sockaddr_in6)

    public var family: Int32 {
        switch self {
        case .v4: return AF_INET
        case .v6: return AF_INET6
        }
    }

    public var port: UInt16 {
        switch self {
        case .v4(let a): return UInt16(bigEndian: a.sin_port)
        case .v6(let a): return UInt16(bigEndian: a.sin6_port)
        }
    }

    /// The same address with another port.
    public func withPort(_ port: UInt16) -> SocketAddress {
        switch self {
        case .v4(var a): a.sin_port = port.bigEndian; return .v4(a)
        case .v6(var a): a.sin6_port = port.bigEndian; return .v6(a)
        }
    }

    /// The numeric host part (`127.0.0.1`, `::1`).
    public var host: String {
        var buf = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        switch self {
        case .v4(var a):
            inet_ntop(AF_INET, &a.sin_addr, &buf, socklen_t(buf.count))
        case .v6(var a):
            inet_ntop(AF_INET6, &a.sin6_addr, &buf, socklen_t(buf.count))
        }
        return String(cString: buf)
    }

    /// `127.0.0.1:80` or `[::1]:80`.
    public var description: String {
        switch self {
        case .v4: return "\(host):\(port)"
        case .v6: return "[\(host)]:\(port)"
        }
    }

    /// Parses a numeric IPv4 or IPv6 host (no brackets) with a port.
    public init?(numericHost host: String, port: UInt16) {
        var a4 = sockaddr_in()
        if inet_pton(AF_INET, host, &a4.sin_addr) == 1 {
            a4.sin_family = sa_family_t(AF_INET)
            a4.sin_port = port.bigEndian
            self = .v4(a4)
            return
        }
        var a6 = sockaddr_in6()
        if inet_pton(AF_INET6, host, &a6.sin6_addr) == 1 {
            a6.sin6_family = sa_family_t(AF_INET6)
            a6.sin6_port = port.bigEndian
            self = .v6(a6)
            return
        }
        return nil
    }

    /// Parses `description`'s form back (`127.0.0.1:80`, `[::1]:80`): how the tunnel
    /// carries a visitor's address.
    public init?(description text: String) {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else { return nil }
        var host = text[..<colon]
        if host.hasPrefix("[") && host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        self.init(numericHost: String(host), port: port)
    }

    /// Reads an address the kernel filled in (accept, getsockname, getaddrinfo).
    public init?(storage: UnsafeRawPointer) {
        let family = storage.load(as: sa_family_t.self)
        switch Int32(family) {
        case AF_INET: self = .v4(storage.load(as: sockaddr_in.self))
        case AF_INET6: self = .v6(storage.load(as: sockaddr_in6.self))
        default: return nil
        }
    }

    public func withSockAddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws(SystemError) -> R) throws(SystemError) -> R {
        switch self {
        case .v4(var a):
            return try withUnsafePointer(to: &a) { (p) throws(SystemError) -> R in
                try body(UnsafeRawPointer(p).assumingMemoryBound(to: sockaddr.self), socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        case .v6(var a):
            return try withUnsafePointer(to: &a) { (p) throws(SystemError) -> R in
                try body(UnsafeRawPointer(p).assumingMemoryBound(to: sockaddr.self), socklen_t(MemoryLayout<sockaddr_in6>.size))
            }
        }
    }

    // Compared and hashed on the raw address and port: UDP session lookup does this per
    // datagram, so no string formatting here.
    public static func == (l: SocketAddress, r: SocketAddress) -> Bool {
        switch (l, r) {
        case (.v4(let a), .v4(let b)):
            return a.sin_port == b.sin_port && a.sin_addr.s_addr == b.sin_addr.s_addr
        case (.v6(let a), .v6(let b)):
            return a.sin6_port == b.sin6_port && a.sin6_scope_id == b.sin6_scope_id
                && withUnsafeBytes(of: a.sin6_addr) { x in withUnsafeBytes(of: b.sin6_addr) { y in x.elementsEqual(y) } }
        default:
            return false
        }
    }

    public func hash(into hasher: inout Hasher) {
        switch self {
        case .v4(let a):
            hasher.combine(a.sin_addr.s_addr)
            hasher.combine(a.sin_port)
        case .v6(let a):
            withUnsafeBytes(of: a.sin6_addr) { hasher.combine(bytes: $0) }
            hasher.combine(a.sin6_port)
            hasher.combine(a.sin6_scope_id)
        }
    }
}

extension Optional where Wrapped == SocketAddress {
    /// The address for a log line, `?` when the kernel gave none.
    public var logDescription: String { map(\.description) ?? "?" }
}

extension sockaddr_in: @unchecked @retroactive Sendable {}
extension sockaddr_in6: @unchecked @retroactive Sendable {}
