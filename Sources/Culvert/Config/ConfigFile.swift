#if canImport(Glibc)
import Glibc
#endif
import TOMLKit

/// A parsed TOML file with typed look-ups whose errors name the file and key. Every key
/// must be read or it is reported as unknown, so typos do not pass silently.
public final class ConfigFile {
    public let path: String
    private let root: TOMLTable
    private var used: Set<String> = []

    public init(path: String) throws(ConfigError) {
        self.path = path
        guard let text = TextFile.read(path) else {
            throw ConfigError(file: path, key: nil, message: "cannot read the file")
        }
        do {
            root = try TOMLTable(string: text)
        } catch let e as TOMLParseError {
            throw ConfigError(file: path, key: nil, message: "line \(e.source.begin.line), column \(e.source.begin.column): \(e.description)")
        } catch {
            throw ConfigError(file: path, key: nil, message: "\(error)")
        }
    }

    /// The keys of the top level, or of every table under `key` together (`services`),
    /// without marking them read: what tells which command a file is for.
    func keys(under key: String? = nil) -> Set<String> {
        guard let key else { return Set(root.keys) }
        guard let table = root[key]?.table else { return [] }
        var out: Set<String> = []
        for name in table.keys { out.formUnion(table[name]?.table?.keys ?? []) }
        return out
    }

    func error(_ key: String, _ message: String) -> ConfigError {
        ConfigError(file: path, key: key, message: message)
    }

    private func value(_ key: String, in table: TOMLTable? = nil, prefix: String = "") -> TOMLValueConvertible? {
        used.insert(prefix + key)
        return (table ?? root)[key]
    }

    public func string(_ key: String, in table: TOMLTable? = nil, prefix: String = "") throws(ConfigError) -> String? {
        guard let v = value(key, in: table, prefix: prefix) else { return nil }
        guard let s = v.string else { throw error(prefix + key, "expected a string, got \(v.type)") }
        return s
    }

    public func int(_ key: String, range: ClosedRange<Int>, in table: TOMLTable? = nil, prefix: String = "") throws(ConfigError) -> Int? {
        guard let v = value(key, in: table, prefix: prefix) else { return nil }
        guard let i = v.int else { throw error(prefix + key, "expected an integer, got \(v.type)") }
        guard range.contains(i) else { throw error(prefix + key, "\(i) is out of range \(range.lowerBound)-\(range.upperBound)") }
        return i
    }

    /// A string or an array of strings.
    public func strings(_ key: String, in table: TOMLTable? = nil, prefix: String = "") throws(ConfigError) -> [String]? {
        guard let v = value(key, in: table, prefix: prefix) else { return nil }
        if let s = v.string { return [s] }
        guard let a = v.array else { throw error(prefix + key, "expected a string or an array of strings, got \(v.type)") }
        var out: [String] = []
        for item in a {
            guard let s = item.string else { throw error(prefix + key, "expected strings in the array, got \(item.type)") }
            out.append(s)
        }
        return out
    }

    public func bool(_ key: String, in table: TOMLTable? = nil, prefix: String = "") throws(ConfigError) -> Bool? {
        guard let v = value(key, in: table, prefix: prefix) else { return nil }
        guard let b = v.bool else { throw error(prefix + key, "expected true or false, got \(v.type)") }
        return b
    }

    /// A service's own token from its table: `token_file` (read and checked), then
    /// `token`, which wins when both are given; nil when neither is.
    func serviceToken(in table: TOMLTable, prefix: String, warnings: inout [String]) throws(ConfigError) -> String? {
        var token: String?
        if let tokenFile = try string("token_file", in: table, prefix: prefix) {
            let origin = TokenOrigin(prefix + "token_file", configFile: path, path: tokenFile, isServiceToken: true)
            token = try TokenRules.read(origin, warnings: &warnings)
        }
        if let text = try string("token", in: table, prefix: prefix) {
            token = try TokenRules.check(text, from: TokenOrigin(prefix + "token", configFile: path, isServiceToken: true))
        }
        return token
    }

    public func duration(_ key: String, in table: TOMLTable? = nil, prefix: String = "") throws(ConfigError) -> Duration? {
        guard let v = value(key, in: table, prefix: prefix) else { return nil }
        if let i = v.int, i >= 0 { return .seconds(i) }
        guard let s = v.string else { throw error(prefix + key, "expected a duration like \"5s\" or \"500ms\", got \(v.type)") }
        do { return try DurationSpec.parse(s) } catch { throw self.error(prefix + key, error.description) }
    }

    /// Sub-tables of `key` (e.g. `[services.ssh]`), sorted by name as the TOML reader keeps them.
    public func tables(_ key: String) throws(ConfigError) -> [(name: String, table: TOMLTable)] {
        guard let v = value(key) else { return [] }
        guard let t = v.table else { throw error(key, "expected a table of named entries, got \(v.type)") }
        var out: [(String, TOMLTable)] = []
        for name in t.keys {
            guard let sub = t[name]?.table else { throw error("\(key).\(name)", "expected a table") }
            out.append((name, sub))
        }
        return out
    }

    /// Fails on keys nobody asked for (`table`: a sub-table checked under `prefix`).
    public func rejectUnknownKeys(in table: TOMLTable? = nil, prefix: String = "") throws(ConfigError) {
        for key in (table ?? root).keys where !used.contains(prefix + key) {
            throw error(prefix + key, "unknown key")
        }
    }

    /// Parses a typed value with a parser whose error text becomes the message.
    public func parse<T, E: Error & CustomStringConvertible>(_ key: String, _ text: String?, _ parser: (String) throws(E) -> T) throws(ConfigError) -> T? {
        guard let text else { return nil }
        do { return try parser(text) } catch { throw self.error(key, error.description) }
    }
}
