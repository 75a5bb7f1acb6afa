#if canImport(Glibc)
import Glibc
#endif
import Transfer

/// One `--allow`/`--deny` destination: a network (CIDR or one address), a host name
/// (`example.com`, or `*.example.com` for the names under it) or `*` for any, with an
/// optional port or port range: `10.0.0.0/8`, `10.1.2.3:22`, `[fd00::/8]:8000-8999`,
/// `*.internal:443`.
public struct ProxyRule: Equatable, Sendable, CustomStringConvertible {
    /// What part of a destination the rule names.
    public enum Host: Equatable, Sendable {
        case any
        /// `bytes` is the network's address (4 or 16 bytes), of which `prefix` bits count.
        case network(bytes: [UInt8], prefix: Int)
        case name(String)
        /// Names ending in `suffix` (which starts with a dot).
        case suffix(String)
    }

    public let host: Host
    public let ports: ClosedRange<UInt16>
    public let description: String

    public struct ParseError: Error, CustomStringConvertible {
        public let input: String
        public let reason: String
        public var description: String { "invalid destination '\(input)': \(reason)" }
    }

    public static func parse(_ text: String) throws(ParseError) -> ProxyRule {
        let input = text.trimmingWhitespace()
        func fail(_ reason: String) -> ParseError { ParseError(input: text, reason: reason) }
        var hostText = Substring(input)
        var portText: Substring?
        if input.hasPrefix("[") {
            guard let close = input.firstIndex(of: "]") else { throw fail("missing ']'") }
            hostText = input[input.index(after: input.startIndex)..<close]
            let rest = input[input.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":") else { throw fail("expected ':PORT' after ']'") }
                portText = rest.dropFirst()
            }
        } else if input.filter({ $0 == ":" }).count == 1, let colon = input.firstIndex(of: ":") {
            hostText = input[..<colon]
            portText = input[input.index(after: colon)...]
        }
        let ports = try portText.map { (p) throws(ParseError) in try parsePorts(p, fail) } ?? 0...65535
        let host = try parseHost(hostText, fail)
        return ProxyRule(host: host, ports: ports, description: input)
    }

    private static func parsePorts(_ text: Substring, _ fail: (String) -> ParseError) throws(ParseError) -> ClosedRange<UInt16> {
        let bounds = text.split(separator: "-", omittingEmptySubsequences: false)
        guard (1...2).contains(bounds.count), let low = UInt16(bounds[0]), let high = UInt16(bounds.last!), low <= high else {
            throw fail("port must be a number 0-65535 or a range LOW-HIGH")
        }
        return low...high
    }

    private static func parseHost(_ text: Substring, _ fail: (String) -> ParseError) throws(ParseError) -> Host {
        if text == "*" { return .any }
        if text.isEmpty { throw fail("empty host") }
        var addressText = text
        var prefix: Int?
        if let slash = text.firstIndex(of: "/") {
            addressText = text[..<slash]
            guard let p = Int(text[text.index(after: slash)...]) else { throw fail("prefix length is not a number") }
            prefix = p
        }
        if let address = SocketAddress(numericHost: String(addressText), port: 0) {
            let bytes = addressBytes(address)
            let bits = prefix ?? bytes.count * 8
            guard (0...bytes.count * 8).contains(bits) else { throw fail("prefix length must be 0-\(bytes.count * 8)") }
            return .network(bytes: bytes, prefix: bits)
        }
        guard prefix == nil else { throw fail("a prefix length needs a numeric address") }
        let lower = text.lowercased()
        if lower.hasPrefix("*.") {
            guard Socks5.hostName(ArraySlice(lower.dropFirst(2).utf8)) != nil else { throw fail("not a valid host name") }
            return .suffix(String(lower.dropFirst()))
        }
        guard Socks5.hostName(ArraySlice(lower.utf8)) != nil else { throw fail("not an address, CIDR or host name") }
        return .name(lower)
    }

    /// Whether the rule names `name` (lowercase, as asked) and `port`; network rules
    /// never match a name, only the addresses it resolves to.
    public func matches(name: String, port: UInt16) -> Bool {
        guard ports.contains(port) else { return false }
        switch host {
        case .any: return true
        case .network: return false
        case .name(let n): return name == n || name == n + "."
        case .suffix(let s): return name.hasSuffix(s) || name.hasSuffix(s + ".")
        }
    }

    /// Whether the rule names `address` (its port included); name rules never match an
    /// address.
    public func matches(address: SocketAddress) -> Bool {
        guard ports.contains(address.port) else { return false }
        switch host {
        case .any: return true
        case .name, .suffix: return false
        case .network(let network, let prefix):
            let bytes = ProxyRule.addressBytes(address)
            guard bytes.count == network.count else { return false }
            var left = prefix
            for (a, n) in zip(bytes, network) where left > 0 {
                let mask: UInt8 = left >= 8 ? 0xFF : ~(0xFF >> UInt8(left))
                if a & mask != n & mask { return false }
                left -= 8
            }
            return true
        }
    }

    /// The address's bytes; an IPv4-mapped IPv6 address counts as the IPv4 address it
    /// carries, so `::ffff:127.0.0.1` cannot slip past a rule for 127.0.0.0/8.
    static func addressBytes(_ address: SocketAddress) -> [UInt8] {
        switch address {
        case .v4(let a):
            return withUnsafeBytes(of: a.sin_addr) { Array($0) }
        case .v6(let a):
            let bytes = withUnsafeBytes(of: a.sin6_addr) { Array($0) }
            if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xFF && bytes[11] == 0xFF { return Array(bytes[12...]) }
            return bytes
        }
    }
}

extension ProxyRule {
    /// Parses each of `texts`; the error names `flag`.
    static func parseAll(_ texts: [String], flag: String) throws(ConfigError) -> [ProxyRule] {
        var out: [ProxyRule] = []
        for text in texts {
            do throws(ProxyRule.ParseError) {
                out.append(try ProxyRule.parse(text))
            } catch {
                throw ConfigError(setting: flag, "\(flag): \(error)")
            }
        }
        return out
    }
}
