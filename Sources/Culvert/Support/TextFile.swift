#if canImport(Glibc)
import Glibc
#endif

/// Small whole-file reads for config files (token files have their own rules: `TokenRules`).
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
}
