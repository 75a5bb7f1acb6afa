/// An address as a user writes it: `host:port`, `[v6]:port`, `port`, `:port` or `*:port`.
public struct HostPort: Equatable, CustomStringConvertible, Sendable {
    /// nil means every local address (wildcard), only meaningful for listening.
    public let host: String?
    public let port: UInt16

    public init(host: String?, port: UInt16) {
        self.host = host
        self.port = port
    }

    public struct ParseError: Error, CustomStringConvertible {
        public let input: String
        public let reason: String
        public var description: String { "invalid address '\(input)': \(reason)" }
    }

    /// Parses a spec. A bare port means loopback (as ssh does for -L); an empty host or
    /// `*` means all interfaces.
    public static func parse(_ text: String) throws(ParseError) -> HostPort {
        let input = text.trimmingWhitespace()
        if input.isEmpty { throw ParseError(input: text, reason: "empty") }
        if let port = UInt16(exactly: Int(input) ?? -1) {
            return HostPort(host: "127.0.0.1", port: port)
        }
        let hostPart: Substring
        let portPart: Substring
        if input.hasPrefix("[") {
            guard let close = input.firstIndex(of: "]") else {
                throw ParseError(input: text, reason: "missing ']' after IPv6 address")
            }
            hostPart = input[input.index(after: input.startIndex)..<close]
            let rest = input[input.index(after: close)...]
            guard rest.hasPrefix(":") else { throw ParseError(input: text, reason: "expected ':PORT' after ']'") }
            portPart = rest.dropFirst()
            if hostPart.isEmpty { throw ParseError(input: text, reason: "empty IPv6 address") }
        } else {
            guard let colon = input.lastIndex(of: ":") else {
                throw ParseError(input: text, reason: "expected HOST:PORT, [IPv6]:PORT or PORT")
            }
            hostPart = input[..<colon]
            portPart = input[input.index(after: colon)...]
            if hostPart.contains(":") {
                throw ParseError(input: text, reason: "write IPv6 addresses in brackets, e.g. [::1]:8080")
            }
        }
        guard let portValue = Int(portPart), !portPart.isEmpty else {
            throw ParseError(input: text, reason: "port '\(portPart)' is not a number")
        }
        guard (0...65535).contains(portValue) else {
            throw ParseError(input: text, reason: "port \(portValue) is out of range 0-65535")
        }
        let host = hostPart.isEmpty || hostPart == "*" ? nil : String(hostPart)
        if let host, !host.allSatisfy({ $0.isLetter || $0.isNumber || ".-_:%".contains($0) }) {
            throw ParseError(input: text, reason: "'\(host)' is not a valid host name or address")
        }
        return HostPort(host: host, port: UInt16(portValue))
    }

    /// The address as a connect target: no host (`:PORT`) means this host, as a bare
    /// PORT does.
    public var asTarget: HostPort { host == nil ? HostPort(host: "127.0.0.1", port: port) : self }

    /// Refuses port 0 in an address culvert connects to: 0 asks the kernel for any free
    /// port when binding, and connecting to it can only fail later, far from the typo.
    public func checkConnectable() throws(ParseError) {
        if port == 0 {
            throw ParseError(input: description, reason: "port 0 is for listening only: give the port to connect to (1-65535)")
        }
    }

    public var description: String {
        guard let host else { return "*:\(port)" }
        return host.contains(":" as Character) ? "[\(host)]:\(port)" : "\(host):\(port)"
    }
}

extension String {
    /// The string without leading and trailing whitespace.
    public func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
}
