#if canImport(Glibc)
import Glibc
#endif
import CCulvert
import Reactor

/// Name resolution with getaddrinfo, which blocks: it runs on an offload thread and the
/// answer comes back on the calling event loop.
public enum Resolver {
    public struct Failure: Error, CustomStringConvertible {
        public let host: String
        public let reason: String
        public var description: String { "cannot resolve '\(host)': \(reason)" }
    }

    /// Addresses for `host` (numeric or a name), IPv4 and IPv6, in getaddrinfo's order.
    /// `passive` asks for wildcard semantics when `host` is nil.
    public static func resolve(host: String?, port: UInt16, passive: Bool, on loop: EventLoop) async throws -> [SocketAddress] {
        if let host, let numeric = SocketAddress(numericHost: host, port: port) {
            return [numeric]
        }
        let result: Result<[SocketAddress], Failure> = await Offload.run(on: loop) {
            resolveBlocking(host: host, port: port, passive: passive)
        }
        return try result.get()
    }

    /// The blocking lookup itself; never call it on a loop thread.
    public static func resolveBlocking(host: String?, port: UInt16, passive: Bool) -> Result<[SocketAddress], Failure> {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : AI_ADDRCONFIG
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        if rc != 0 {
            return .failure(Failure(host: host ?? "*", reason: String(cString: gai_strerror(rc))))
        }
        defer { freeaddrinfo(list) }
        var out: [SocketAddress] = []
        var node = list
        while let n = node {
            if let addr = n.pointee.ai_addr, let a = SocketAddress(storage: addr), !out.contains(a) {
                out.append(a)
            }
            node = n.pointee.ai_next
        }
        if out.isEmpty { return .failure(Failure(host: host ?? "*", reason: "no addresses")) }
        return .success(out)
    }
}
