#if canImport(Glibc)
import Glibc
#endif
import Transfer

/// The SOCKS5 wire format (RFC 1928, with RFC 1929 username/password): pure parsers over
/// the bytes received so far and the encoders of the replies. Every parser answers
/// `incomplete` until its message is whole, so the caller reads more and asks again.
public enum Socks5 {
    public static let version: UInt8 = 5

    /// What a parser found in the bytes given.
    public enum Parse<Message: Equatable>: Equatable {
        case incomplete
        /// The message and how many bytes it took.
        case done(Message, consumed: Int)
        /// Not a valid message: the reply to send before closing, and why.
        case invalid(Reply, String)
    }

    /// Authentication methods (RFC 1928 §3).
    public enum Method: UInt8, Sendable {
        case none = 0x00
        case usernamePassword = 0x02
        case noAcceptable = 0xFF
    }

    /// Reply codes (RFC 1928 §6).
    public enum Reply: UInt8, Sendable {
        case succeeded = 0x00
        case generalFailure = 0x01
        case notAllowed = 0x02
        case networkUnreachable = 0x03
        case hostUnreachable = 0x04
        case connectionRefused = 0x05
        case ttlExpired = 0x06
        case commandNotSupported = 0x07
        case addressTypeNotSupported = 0x08
    }

    /// The request's command byte: culvert answers BIND with `commandNotSupported`, so
    /// it keeps which one was asked for the log.
    public enum Command: UInt8, Equatable, Sendable {
        case connect = 0x01
        case bind = 0x02
        case udpAssociate = 0x03
    }

    /// A request (RFC 1928 §4).
    public struct Request: Equatable, Sendable {
        public let command: Command
        public let destination: ProxyDestination
    }

    /// The client's greeting: the methods it offers.
    public static func parseGreeting(_ b: [UInt8]) -> Parse<[UInt8]> {
        guard b.count >= 2 else { return .incomplete }
        guard b[0] == version else { return .invalid(.generalFailure, "not SOCKS5 (version \(b[0]))") }
        let n = Int(b[1])
        guard n > 0 else { return .invalid(.generalFailure, "greeting offers no method") }
        guard b.count >= 2 + n else { return .incomplete }
        return .done(Array(b[2..<2 + n]), consumed: 2 + n)
    }

    /// The whole answer to a SOCKS4 request (version 4): "request rejected or failed".
    public static let socks4Rejected: [UInt8] = [0, 0x5B, 0, 0, 0, 0, 0, 0]

    /// The answer to the greeting: the method chosen.
    public static func methodChoice(_ method: Method) -> [UInt8] { [version, method.rawValue] }

    /// Username and password (RFC 1929 §2).
    public struct Credentials: Equatable, Sendable {
        public let user: [UInt8]
        public let password: [UInt8]
    }

    public static func parseCredentials(_ b: [UInt8]) -> Parse<Credentials> {
        guard b.count >= 2 else { return .incomplete }
        guard b[0] == 1 else { return .invalid(.generalFailure, "unknown username/password version \(b[0])") }
        let ulen = Int(b[1])
        guard b.count >= 2 + ulen + 1 else { return .incomplete }
        let plen = Int(b[2 + ulen])
        let end = 3 + ulen + plen
        guard b.count >= end else { return .incomplete }
        return .done(Credentials(user: Array(b[2..<2 + ulen]), password: Array(b[3 + ulen..<end])), consumed: end)
    }

    /// The username/password status: 0 accepts, anything else refuses (and closes).
    public static func authStatus(ok: Bool) -> [UInt8] { [1, ok ? 0 : 1] }

    public static func parseRequest(_ b: [UInt8]) -> Parse<Request> {
        guard b.count >= 4 else { return .incomplete }
        guard b[0] == version else { return .invalid(.generalFailure, "request version \(b[0])") }
        guard let command = Command(rawValue: b[1]) else { return .invalid(.commandNotSupported, "unknown command \(b[1])") }
        switch parseAddress(b, at: 3) {
        case .incomplete: return .incomplete
        case .invalid(let reply, let why): return .invalid(reply, why)
        case .done(let destination, let end):
            // Port 0 names no service (a UDP ASSOCIATE uses it to say "any port"); the
            // reply code is dante's for the same request.
            if command != .udpAssociate && destination.port == 0 {
                return .invalid(.addressTypeNotSupported, "destination port 0")
            }
            return .done(Request(command: command, destination: destination), consumed: end)
        }
    }

    /// ATYP, DST.ADDR and DST.PORT starting at `at` (RFC 1928 §4 and §7); `consumed` is
    /// the index just past the port.
    static func parseAddress(_ b: [UInt8], at start: Int) -> Parse<ProxyDestination> {
        guard b.count > start else { return .incomplete }
        let portAt: Int
        let destination: (UInt16) -> ProxyDestination
        switch b[start] {
        case 0x01:
            portAt = start + 5
            guard b.count >= portAt + 2 else { return .incomplete }
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            withUnsafeMutableBytes(of: &a.sin_addr) { $0.copyBytes(from: b[(start + 1)..<portAt]) }
            destination = { .address(.v4(a).withPort($0)) }
        case 0x04:
            portAt = start + 17
            guard b.count >= portAt + 2 else { return .incomplete }
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            withUnsafeMutableBytes(of: &a.sin6_addr) { $0.copyBytes(from: b[(start + 1)..<portAt]) }
            destination = { .address(.v6(a).withPort($0)) }
        case 0x03:
            guard b.count > start + 1 else { return .incomplete }
            portAt = start + 2 + Int(b[start + 1])
            guard b.count >= portAt + 2 else { return .incomplete }
            guard let name = hostName(b[(start + 2)..<portAt]) else {
                return .invalid(.hostUnreachable, "not a valid host name")
            }
            destination = { .name(name, port: $0) }
        default:
            return .invalid(.addressTypeNotSupported, "unknown address type \(b[start])")
        }
        let port = UInt16(b[portAt]) << 8 | UInt16(b[portAt + 1])
        return .done(destination(port), consumed: portAt + 2)
    }

    /// A domain name as DNS allows it: letters, digits, '-', '_' and dots, 1-253 bytes,
    /// labels of at most 63; a numeric address written as a name is accepted too.
    static func hostName(_ bytes: ArraySlice<UInt8>) -> String? {
        guard let text = String(validating: bytes, as: UTF8.self) else { return nil }
        if SocketAddress(numericHost: text, port: 0) != nil { return text }
        guard (1...253).contains(bytes.count) else { return nil }
        let labels = bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        for (i, label) in labels.enumerated() {
            // A trailing dot (fully qualified) leaves one empty label at the end.
            if label.isEmpty && i == labels.count - 1 && i > 0 { continue }
            guard (1...63).contains(label.count), label.first != UInt8(ascii: "-"),
                  label.allSatisfy({ isNameByte($0) }) else { return nil }
        }
        return text
    }

    private static func isNameByte(_ c: UInt8) -> Bool {
        (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2D || c == 0x5F
    }

    /// A reply; `bound` is the proxy's address for the connection (zeros when there is none).
    public static func reply(_ code: Reply, bound: SocketAddress? = nil) -> [UInt8] {
        [version, code.rawValue, 0] + encodeAddress(bound)
    }

    /// ATYP, address and port of `address` (IPv4 zeros for nil).
    static func encodeAddress(_ address: SocketAddress?) -> [UInt8] {
        var out: [UInt8] = []
        switch address {
        case .v6(let a)?:
            out.append(0x04)
            withUnsafeBytes(of: a.sin6_addr) { out += $0 }
        case .v4(let a)?:
            out.append(0x01)
            withUnsafeBytes(of: a.sin_addr) { out += $0 }
        case nil:
            out += [0x01, 0, 0, 0, 0]
        }
        let port = address?.port ?? 0
        out += [UInt8(port >> 8), UInt8(port & 0xFF)]
        return out
    }

    /// The header of a UDP ASSOCIATE datagram (RFC 1928 §7): where it goes, and whether
    /// it is one fragment of several (culvert does not reassemble those).
    public struct DatagramHeader: Equatable, Sendable {
        public let fragment: UInt8
        public let destination: ProxyDestination
        /// Header bytes before the payload.
        public let length: Int
    }

    /// The header at the start of a datagram the client sent; nil when it is not one.
    /// Only the header's bytes are looked at: the payload is never copied.
    public static func parseDatagramHeader(_ datagram: UnsafeRawBufferPointer) -> DatagramHeader? {
        // The longest header: 4 bytes, a 255-byte name with its length, 2 bytes of port.
        let head = Array(datagram.prefix(4 + 256 + 2))
        guard head.count >= 4, head[0] == 0, head[1] == 0 else { return nil }
        guard case .done(let destination, let end) = parseAddress(head, at: 3) else { return nil }
        return DatagramHeader(fragment: head[2], destination: destination, length: end)
    }

    /// The header culvert puts before a reply: the address it came from.
    public static func datagramHeader(source: SocketAddress) -> [UInt8] {
        [0, 0, 0] + encodeAddress(source)
    }
}
