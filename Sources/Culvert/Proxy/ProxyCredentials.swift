/// The users allowed to use the proxy (`--auth-file`: one `user:password` a line; blank
/// lines and lines starting with `#` are skipped), checked for SOCKS5 username/password
/// (RFC 1929) and HTTP `Proxy-Authorization: Basic`.
///
/// The check compares with every entry, each byte of each, whatever matched: its time
/// does not tell how much of a guess was right.
public struct ProxyCredentials: Sendable {
    private let entries: [(user: [UInt8], password: [UInt8])]

    public var count: Int { entries.count }

    /// Parses the file's text; `source` names it in errors.
    public init(text: String, source: String) throws(ConfigError) {
        var entries: [(user: [UInt8], password: [UInt8])] = []
        for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.hasSuffix("\r") ? raw.dropLast() : raw
            if line.isEmpty || line.hasPrefix("#") { continue }
            guard let colon = line.firstIndex(of: ":"), colon != line.startIndex else {
                throw ConfigError(setting: "--auth-file", "--auth-file \(source): line \(n + 1) is not user:password")
            }
            let user = Array(line[..<colon].utf8)
            let password = Array(line[line.index(after: colon)...].utf8)
            // RFC 1929 carries each in one length byte.
            guard user.count <= 255, password.count <= 255 else {
                throw ConfigError(setting: "--auth-file", "--auth-file \(source): line \(n + 1): user and password must be at most 255 bytes each")
            }
            entries.append((user, password))
        }
        guard !entries.isEmpty else {
            throw ConfigError(setting: "--auth-file", "--auth-file \(source) has no user:password line")
        }
        self.entries = entries
    }

    /// Reads and parses `path`.
    public static func load(_ path: String) throws(ConfigError) -> ProxyCredentials {
        guard let text = TextFile.read(path) else {
            throw ConfigError(setting: "--auth-file", "--auth-file \(path): cannot read the file (missing, unreadable or not UTF-8)")
        }
        return try ProxyCredentials(text: text, source: path)
    }

    public func check(user: [UInt8], password: [UInt8]) -> Bool {
        var found = false
        for e in entries {
            let userMatches = ProxyCredentials.equal(e.user, user)
            let passwordMatches = ProxyCredentials.equal(e.password, password)
            if userMatches && passwordMatches { found = true }
        }
        return found
    }

    /// Checks the value of a `Proxy-Authorization` field (`Basic base64(user:password)`).
    public func check(basic value: String) -> Bool {
        let parts = value.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "basic", let decoded = Base64.decode(String(parts[1]).trimmingWhitespace()),
              let colon = decoded.firstIndex(of: UInt8(ascii: ":")) else { return false }
        return check(user: Array(decoded[..<colon]), password: Array(decoded[(colon + 1)...]))
    }

    /// Equal contents, in time that depends on the lengths only.
    private static func equal(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        var diff = UInt8(a.count == b.count ? 0 : 1)
        for i in 0..<max(a.count, b.count) {
            diff |= (i < a.count ? a[i] : 0) ^ (i < b.count ? b[i] : 0)
        }
        return diff == 0
    }
}
