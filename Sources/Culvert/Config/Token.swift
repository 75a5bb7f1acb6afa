#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// Where a token came from, so that the error refusing it and the warning about its file
/// name the flag, variable or config key a person has to fix.
struct TokenOrigin {
    /// The flag, variable or key to blame: `--token`, `CULVERT_TOKEN`, `services.db.token`.
    let setting: String
    /// The config file holding `setting`; nil for flags and the environment.
    let configFile: String?
    /// The token file, when the token is read from one.
    let path: String?
    /// A secret service's own token rather than the shared one.
    let isServiceToken: Bool

    init(_ setting: String, configFile: String? = nil, path: String? = nil, isServiceToken: Bool = false) {
        self.setting = setting
        self.configFile = configFile
        self.path = path
        self.isServiceToken = isServiceToken
    }

    /// The token file as a person finds it: with its flag, or alone when the error already
    /// names the config file and key.
    var fileName: String {
        let quoted = "'\(path ?? "")'"
        return configFile == nil ? "\(setting) \(quoted)" : quoted
    }

    /// "the token from CULVERT_TOKEN", "the service token in --service-token-file 'F'", ...
    var phrase: String {
        let noun = isServiceToken ? "service token" : "token"
        if path != nil { return "the \(noun) in \(fileName)" }
        return configFile == nil ? "the \(noun) from \(setting)" : "the \(noun)"
    }

    func error(_ message: String) -> ConfigError {
        guard let configFile else { return ConfigError(setting: setting, message) }
        return ConfigError(file: configFile, key: setting, message: message)
    }
}

/// The rules every token follows, from whichever flag, variable, file or key it comes.
/// A server sends its proof to any peer that completes the transport, so on `plain` and
/// certificate TLS anyone can test guesses offline; only a token too long to guess makes
/// that useless, hence a hard minimum rather than a warning.
public enum TokenRules {
    /// Fewest bytes a token may have, not counting leading and trailing whitespace.
    public static let minimumBytes = 16
    /// Most bytes read from a token file: it holds one token on its first line, so a
    /// larger file is a wrong path (a log, a binary), not a token.
    public static let maximumFileBytes = 4096

    /// `token` unchanged when it is long enough; otherwise an error naming its origin and
    /// how to make a good one.
    static func check(_ token: String, from origin: TokenOrigin) throws(ConfigError) -> String {
        let fix = "a token needs at least \(minimumBytes) bytes: make one with 'culvert token'"
        if token.isEmpty { throw origin.error("\(origin.phrase) is empty; \(fix)") }
        let core = token.trimmingWhitespace()
        if core.isEmpty { throw origin.error("\(origin.phrase) is only whitespace; \(fix)") }
        if core.utf8.count < minimumBytes {
            throw origin.error("\(origin.phrase) is too short (\(core.utf8.count) bytes); \(fix)")
        }
        return token
    }

    /// The first non-empty line of the token file `origin.path`, trimmed and checked. A
    /// file that group or others may open adds a warning: the token is the only key.
    static func read(_ origin: TokenOrigin, warnings: inout [String]) throws(ConfigError) -> String {
        let path = origin.path ?? ""
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY)
        guard fd >= 0 else { throw origin.error("cannot read \(origin.fileName): \(reason(errno))") }
        defer { close(fd) }
        var status = stat()
        guard fstat(fd, &status) == 0 else { throw origin.error("cannot read \(origin.fileName): \(reason(errno))") }
        let type = status.st_mode & S_IFMT
        if type == S_IFDIR { throw origin.error("cannot read \(origin.fileName): \(reason(EISDIR))") }
        var bytes = [UInt8](repeating: 0, count: maximumFileBytes + 1)
        var count = 0
        while count < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + count, $0.count - count) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw origin.error("cannot read \(origin.fileName): \(reason(errno))") }
            if n == 0 { break }
            count += n
        }
        if count > maximumFileBytes {
            throw origin.error("\(origin.fileName) is larger than \(maximumFileBytes) bytes; a token file holds one token on its first line")
        }
        guard let text = String(validating: bytes[..<count], as: UTF8.self) else {
            throw origin.error("\(origin.fileName) is not UTF-8 text")
        }
        if type == S_IFREG && status.st_mode & 0o077 != 0 {
            let mode = String(status.st_mode & 0o777, radix: 8)
            warnings.append("token file '\(path)' can be read or changed by group or others (mode 0\(mode)); run chmod 600 '\(path)'")
        }
        let first = text.split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
        return try check(first, from: origin).trimmingWhitespace()
    }

    /// Why a token file cannot be read, telling a missing file, a permission and a
    /// directory apart.
    private static func reason(_ code: Int32) -> String {
        switch code {
        case ENOENT: return "no such file (ENOENT)"
        case EACCES: return "permission denied (EACCES)"
        case EISDIR: return "it is a directory (EISDIR)"
        default: return "\(String(cString: strerror(code))) (\(SystemError("open", errno: code).errnoName))"
        }
    }
}
