#if canImport(Glibc)
import Glibc
#endif

/// Small whole-file reads for config and token files.
public enum TextFile {
    /// The file as UTF-8 text; nil when it cannot be read or is not UTF-8.
    public static func read(_ path: String) -> String? {
        guard let f = fopen(path, "r") else { return nil }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 8192)
        while true {
            let n = fread(&buf, 1, buf.count, f)
            if n > 0 { bytes += buf[0..<n] }
            if n < buf.count { break }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    /// Why a token file is unusable; `what` names the flag or key it came from.
    public struct TokenError: Error, CustomStringConvertible {
        public let description: String
    }

    /// A token file's first line, trimmed.
    public static func token(at path: String, what: String) throws(TokenError) -> String {
        guard let text = read(path) else { throw TokenError(description: "\(what): cannot read '\(path)'") }
        let first = text.split(whereSeparator: \.isNewline).first.map(String.init)?.trimmingWhitespace() ?? ""
        guard !first.isEmpty else { throw TokenError(description: "\(what): '\(path)' is empty") }
        return first
    }
}
