#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// The PROXY protocol header a proxy puts in front of a connection's bytes to say whose
/// connection it is (haproxy's proxy-protocol.txt, text version 1 and binary version 2).
/// Only TCP over IPv4/IPv6 carries addresses here; everything else the spec allows
/// (v1 UNKNOWN, v2 LOCAL, UNSPEC, AF_UNIX, datagrams) reads as `.local`: the receiver
/// keeps the connection's own endpoints, as the spec asks.
public enum ProxyHeader: Equatable, Sendable {
    /// No addresses to believe: the connection's own endpoints stand.
    case local
    /// The connection was made by `source` to `destination` and relayed by the sender.
    case proxied(source: SocketAddress, destination: SocketAddress)

    /// The two wire formats.
    public enum Version: String, Equatable, Sendable, CaseIterable {
        case v1, v2
    }

    /// The outcome of reading the bytes a connection has sent so far.
    public enum Parse: Equatable {
        /// A whole header, `length` bytes long; the connection's own bytes follow it.
        case complete(ProxyHeader, length: Int)
        /// No whole header yet. Every byte seen so far belongs to the header, and the
        /// reader may look at up to `readUpTo` bytes in all without passing its end by
        /// more than it can give back (the caller peeks, and consumes only header bytes).
        case incomplete(readUpTo: Int)
    }

    /// The v2 signature, chosen by the spec so that it cannot start any text protocol.
    static let signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    static let v1Prefix = Array("PROXY ".utf8)
    /// The spec's longest v1 line, CRLF included.
    public static let v1MaxLength = 107
    /// The fixed part of a v2 header: signature, version/command, family, length.
    static let v2FixedLength = 16
    /// The largest v2 header taken, TLVs included. The spec allows 16 + 65,535 bytes;
    /// load balancers send well under 1 KiB (addresses plus a few TLVs), and a header
    /// is held whole while it arrives, so a connection cannot make us hold 64 KiB.
    public static let v2MaxLength = 4096

    /// The client's address the header names; nil for `.local`.
    public var source: SocketAddress? {
        guard case .proxied(let source, _) = self else { return nil }
        return source
    }

    // MARK: encoding

    /// Writes the header to a socket just connected, before any other byte. Its send
    /// buffer is empty then, so the header (at most 52 bytes, 104 in text) goes in one
    /// call; a socket that cannot take that much is failing, and a short write is
    /// reported as such rather than queued.
    public func write(_ version: Version, to fd: Int32) throws(SystemError) {
        let bytes = encode(version)
        switch bytes.withUnsafeBytes({ Net.write(fd, $0.baseAddress!, $0.count) }) {
        case .bytes(let n) where n == bytes.count: return
        case .bytes, .wouldBlock, .eof: throw SystemError("send", errno: EAGAIN)
        case .failed(let error): throw error
        }
    }

    /// The header in `version`'s format. Mixed families (an IPv4 source towards an IPv6
    /// destination) are sent as IPv6 with the IPv4 address mapped (`::ffff:a.b.c.d`),
    /// since both formats carry one family for both ends.
    public func encode(_ version: Version) -> [UInt8] {
        switch (self, version) {
        case (.local, .v1):
            return Array("PROXY UNKNOWN\r\n".utf8)
        case (.local, .v2):
            return Self.signature + [0x20, 0x00, 0x00, 0x00]
        case (.proxied(let source, let destination), .v1):
            let (s, d) = Self.sameFamily(source, destination)
            let family = s.family == AF_INET ? "TCP4" : "TCP6"
            return Array("PROXY \(family) \(s.host) \(d.host) \(s.port) \(d.port)\r\n".utf8)
        case (.proxied(let source, let destination), .v2):
            let (s, d) = Self.sameFamily(source, destination)
            let ipv4 = s.family == AF_INET
            var out = Self.signature
            out.append(0x21)
            out.append(ipv4 ? 0x11 : 0x21)
            let length: UInt16 = ipv4 ? 12 : 36
            out.append(UInt8(length >> 8))
            out.append(UInt8(length & 0xFF))
            out += s.rawAddress
            out += d.rawAddress
            for port in [s.port, d.port] {
                out.append(UInt8(port >> 8))
                out.append(UInt8(port & 0xFF))
            }
            return out
        }
    }

    private static func sameFamily(_ a: SocketAddress, _ b: SocketAddress) -> (SocketAddress, SocketAddress) {
        if a.family == b.family { return (a, b) }
        return (a.mappedToIPv6, b.mappedToIPv6)
    }

    // MARK: parsing

    /// Reads a header from the start of `bytes` (what the connection has sent so far).
    /// Throws as soon as the bytes cannot be the start of a valid header, so a client
    /// that sends its own protocol instead is turned away after its first bytes.
    public static func parse(_ bytes: some Collection<UInt8>) throws(ProxyHeaderError) -> Parse {
        let b = Array(bytes)
        guard let first = b.first else { return .incomplete(readUpTo: v2FixedLength) }
        if first == v1Prefix[0] { return try parseV1(b) }
        if first == signature[0] { return try parseV2(b) }
        throw .missing
    }

    private static func parseV1(_ b: [UInt8]) throws(ProxyHeaderError) -> Parse {
        let checked = min(b.count, v1Prefix.count)
        guard b[0..<checked].elementsEqual(v1Prefix[0..<checked]) else { throw .missing }
        guard let lf = b.firstIndex(of: 0x0A) else {
            if b.count >= v1MaxLength { throw .oversized(b.count) }
            return .incomplete(readUpTo: v1MaxLength)
        }
        guard lf + 1 <= v1MaxLength else { throw .oversized(lf + 1) }
        guard lf > 0, b[lf - 1] == 0x0D else { throw .malformed("v1 line does not end in CRLF") }
        guard let line = String(validating: b[v1Prefix.count..<(lf - 1)], as: UTF8.self) else {
            throw .malformed("v1 line is not text")
        }
        let fields = line.split(separator: " ", omittingEmptySubsequences: false)
        let length = lf + 1
        if fields.first == "UNKNOWN" { return .complete(.local, length: length) }
        guard fields.count == 5 else { throw .malformed("v1 line has \(fields.count) fields after PROXY, want 5") }
        let family: Int32
        switch fields[0] {
        case "TCP4": family = AF_INET
        case "TCP6": family = AF_INET6
        default: throw .malformed("v1 protocol '\(fields[0].prefix(8))' is not TCP4, TCP6 or UNKNOWN")
        }
        guard let sourcePort = port(fields[3]), let destinationPort = port(fields[4]) else {
            throw .malformed("v1 port is not a number from 0 to 65535")
        }
        guard let source = SocketAddress(numericHost: String(fields[1]), port: sourcePort), source.family == family,
              let destination = SocketAddress(numericHost: String(fields[2]), port: destinationPort), destination.family == family else {
            throw .malformed("v1 address is not an \(family == AF_INET ? "IPv4" : "IPv6") address")
        }
        return .complete(.proxied(source: source, destination: destination), length: length)
    }

    /// A decimal port without sign or leading zeros, as the spec writes them.
    private static func port(_ text: Substring) -> UInt16? {
        guard !text.isEmpty, text.count <= 5, text.allSatisfy(\.isASCIIDigit), text == "0" || text.first != "0" else { return nil }
        return UInt16(text)
    }

    private static func parseV2(_ b: [UInt8]) throws(ProxyHeaderError) -> Parse {
        let checked = min(b.count, signature.count)
        guard b[0..<checked].elementsEqual(signature[0..<checked]) else { throw .missing }
        guard b.count >= v2FixedLength else { return .incomplete(readUpTo: v2FixedLength) }
        let versionCommand = b[12]
        guard versionCommand >> 4 == 2 else { throw .malformed("v2 version \(versionCommand >> 4), want 2") }
        let command = versionCommand & 0x0F
        guard command <= 1 else { throw .malformed("v2 command \(command) is not LOCAL or PROXY") }
        let family = b[13] >> 4
        let transport = b[13] & 0x0F
        guard family <= 3, transport <= 2 else { throw .malformed("v2 address family/transport 0x\(String(b[13], radix: 16)) is not defined") }
        let length = v2FixedLength + (Int(b[14]) << 8 | Int(b[15]))
        guard length <= v2MaxLength else { throw .oversized(length) }
        guard b.count >= length else { return .incomplete(readUpTo: length) }
        let addressLength: Int
        switch family {
        case 1: addressLength = 12
        case 2: addressLength = 36
        case 3: addressLength = 216
        default: addressLength = 0
        }
        guard length - v2FixedLength >= addressLength else {
            throw .malformed("v2 length \(length - v2FixedLength) is shorter than its addresses (\(addressLength))")
        }
        try checkTLVs(b[(v2FixedLength + addressLength)..<length])
        // LOCAL: the sender's own connection (a health check); the spec says to keep the
        // real endpoints whatever the address block holds.
        guard command == 1, transport == 1, family == 1 || family == 2 else { return .complete(.local, length: length) }
        let a = v2FixedLength
        let size = family == 1 ? 4 : 16
        let sourcePort = UInt16(b[a + 2 * size]) << 8 | UInt16(b[a + 2 * size + 1])
        let destinationPort = UInt16(b[a + 2 * size + 2]) << 8 | UInt16(b[a + 2 * size + 3])
        let source = SocketAddress(raw: b[a..<(a + size)], port: sourcePort)
        let destination = SocketAddress(raw: b[(a + size)..<(a + 2 * size)], port: destinationPort)
        return .complete(.proxied(source: source, destination: destination), length: length)
    }

    /// TLVs are skipped, but their framing must add up: a TLV running past the header
    /// means the sender and we disagree about where its bytes start.
    private static func checkTLVs(_ tlvs: ArraySlice<UInt8>) throws(ProxyHeaderError) {
        var i = tlvs.startIndex
        while i < tlvs.endIndex {
            guard tlvs.endIndex - i >= 3 else { throw .malformed("v2 TLV header truncated") }
            let valueLength = Int(tlvs[i + 1]) << 8 | Int(tlvs[i + 2])
            i += 3 + valueLength
            guard i <= tlvs.endIndex else { throw .malformed("v2 TLV of type 0x\(String(tlvs[i - 3 - valueLength], radix: 16)) runs past the header") }
        }
    }
}

/// Why a connection's PROXY header was refused.
public enum ProxyHeaderError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The first bytes are neither `PROXY ` nor the v2 signature.
    case missing
    /// Longer than the spec's v1 line or our v2 limit.
    case oversized(Int)
    case malformed(String)
    /// The connection ended before a whole header.
    case truncated
    case timedOut
    case failed(SystemError)
    /// The owner gave up waiting (a drain deadline).
    case cancelled

    /// A short label for metrics and refusal summaries.
    public var label: String {
        switch self {
        case .missing: return "proxy_header_missing"
        case .oversized: return "proxy_header_oversized"
        case .malformed: return "proxy_header_malformed"
        case .truncated: return "proxy_header_truncated"
        case .timedOut: return "proxy_header_timeout"
        case .failed: return "proxy_header_failed"
        case .cancelled: return "cancelled"
        }
    }

    public var description: String {
        switch self {
        case .missing: return "no PROXY protocol header"
        case .oversized(let n): return "PROXY header too long (\(n) bytes)"
        case .malformed(let why): return "malformed PROXY header: \(why)"
        case .truncated: return "connection closed inside the PROXY header"
        case .timedOut: return "no whole PROXY header in time"
        case .failed(let error): return "reading the PROXY header: \(error)"
        case .cancelled: return "given up while waiting for the PROXY header"
        }
    }
}

extension Character {
    fileprivate var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}

extension SocketAddress {
    /// The address bytes in network order (4 or 16).
    var rawAddress: [UInt8] {
        switch self {
        case .v4(var a): return withUnsafeBytes(of: &a.sin_addr) { Array($0) }
        case .v6(var a): return withUnsafeBytes(of: &a.sin6_addr) { Array($0) }
        }
    }

    /// IPv4 as `::ffff:a.b.c.d`; IPv6 as it is.
    var mappedToIPv6: SocketAddress {
        guard case .v4 = self else { return self }
        return SocketAddress(raw: [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF] + rawAddress, port: port)
    }

    /// An address from 4 or 16 bytes in network order.
    init(raw: some Collection<UInt8>, port: UInt16) {
        if raw.count == 4 {
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = port.bigEndian
            withUnsafeMutableBytes(of: &a.sin_addr) { $0.copyBytes(from: raw) }
            self = .v4(a)
        } else {
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            a.sin6_port = port.bigEndian
            withUnsafeMutableBytes(of: &a.sin6_addr) { $0.copyBytes(from: raw) }
            self = .v6(a)
        }
    }
}
