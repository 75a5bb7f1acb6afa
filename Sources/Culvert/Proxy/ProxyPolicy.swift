import Transfer

/// Which destinations the proxy may reach: `--deny` rules win over `--allow` rules; with
/// no `--allow`, whatever is not denied is allowed, with some, only what they name. A
/// name is checked as asked and then each address it resolves to, so a name that
/// resolves to a denied address is denied.
///
/// A tunnel server's exit adds `guarded` networks (loopback, link-local, its own
/// addresses): denied unless an allow rule for a network (not `*`, not a name) names
/// the address, so that reaching the exit's own host is a choice made on purpose.
public struct ProxyPolicy: Sendable {
    public let allow: [ProxyRule]
    public let deny: [ProxyRule]
    public let guarded: [ProxyRule]

    public init(allow: [ProxyRule] = [], deny: [ProxyRule] = [], guarded: [ProxyRule] = []) {
        self.allow = allow
        self.deny = deny
        self.guarded = guarded
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
        if guarded.contains(where: { $0.matches(address: address) }) {
            return allow.contains { rule in
                if case .network = rule.host { return rule.matches(address: address) }
                return false
            }
        }
        return allowedByName || allow.isEmpty || allow.contains { $0.matches(address: address) }
    }
}
