import Transfer

/// Which destinations the proxy may reach: `--deny` rules win over `--allow` rules; with
/// no `--allow`, whatever is not denied is allowed, with some, only what they name. A
/// name is checked as asked and then each address it resolves to, so a name that
/// resolves to a denied address is denied.
public struct ProxyPolicy: Sendable {
    public let allow: [ProxyRule]
    public let deny: [ProxyRule]

    public init(allow: [ProxyRule] = [], deny: [ProxyRule] = []) {
        self.allow = allow
        self.deny = deny
    }

    /// The verdict on a name before it is resolved.
    public enum NameVerdict: Equatable, Sendable {
        case denied
        /// Resolve it; `allowedByName` says an allow rule names it, so its addresses
        /// need not be named too (deny rules still apply to them).
        case resolve(allowedByName: Bool)
    }

    public func check(name: String, port: UInt16) -> NameVerdict {
        let lower = name.lowercased()
        if deny.contains(where: { $0.matches(name: lower, port: port) }) { return .denied }
        return .resolve(allowedByName: allow.isEmpty || allow.contains { $0.matches(name: lower, port: port) })
    }

    /// Whether `address` (with the destination port) may be reached.
    public func admits(_ address: SocketAddress, allowedByName: Bool) -> Bool {
        if deny.contains(where: { $0.matches(address: address) }) { return false }
        return allowedByName || allow.isEmpty || allow.contains { $0.matches(address: address) }
    }
}
