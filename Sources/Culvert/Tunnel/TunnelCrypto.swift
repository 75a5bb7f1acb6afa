#if canImport(Glibc)
import Glibc
#endif
import CCulvertTLS
import COpenSSL
import Synchronization
import Transfer

/// The few primitives the tunnel's authentication needs, from OpenSSL.
enum TunnelCrypto {
    static func hmacSHA256(key: [UInt8], _ parts: [UInt8]...) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var lengths = parts.map(\.count)
        withPointers(parts) { pointers in
            culvert_hmac_sha256(key, key.count, pointers, &lengths, Int32(parts.count), &out)
        }
        return out
    }

    /// Base pointers of each array, valid inside `body`.
    private static func withPointers<R>(_ arrays: [[UInt8]], _ body: (UnsafePointer<UnsafePointer<UInt8>?>) -> R) -> R {
        var pointers: [UnsafePointer<UInt8>?] = []
        func nest(_ i: Int) -> R {
            if i == arrays.count { return pointers.withUnsafeBufferPointer { body($0.baseAddress!) } }
            return arrays[i].withUnsafeBufferPointer { buf in
                pointers.append(buf.baseAddress ?? UnsafePointer(bitPattern: 1))
                return nest(i + 1)
            }
        }
        return nest(0)
    }

    /// HKDF-SHA256 (RFC 5869) with an empty salt.
    static func hkdf(secret: [UInt8], info: String, length: Int = 32) -> [UInt8] {
        let prk = hmacSHA256(key: [UInt8](repeating: 0, count: 32), secret)
        var okm: [UInt8] = []
        var block: [UInt8] = []
        var counter: UInt8 = 1
        while okm.count < length {
            block = hmacSHA256(key: prk, block, Array(info.utf8), [counter])
            okm += block
            counter += 1
        }
        return Array(okm.prefix(length))
    }

    /// Fresh random bytes from OpenSSL's CSPRNG, drawn 4 KiB at a time: the tunnel takes
    /// a nonce per data channel, and each RAND_bytes call costs far more than 16 bytes.
    static func random(_ count: Int) -> [UInt8] {
        RandomPool.shared.withLock { $0.take(count) }
    }

    /// Compares in time independent of where the inputs differ.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        return CRYPTO_memcmp(a, b, a.count) == 0
    }
}

/// The secrets one token gives: an auth key for the handshake proofs, a TLS PSK and a
/// key for wss channel binding, derived apart so none reveals another.
struct TokenKeys: Sendable {
    let auth: [UInt8]
    let tlsPSK: [UInt8]
    let channelBinding: [UInt8]

    init(token: String) {
        let secret = Array(token.utf8)
        auth = TunnelCrypto.hkdf(secret: secret, info: "culvert/1 auth")
        tlsPSK = TunnelCrypto.hkdf(secret: secret, info: "culvert/1 tls external psk")
        channelBinding = TunnelCrypto.hkdf(secret: secret, info: "culvert/1 ws channel binding")
    }
}

/// A new random token: 32 bytes from OpenSSL's CSPRNG, base64url without padding.
public func randomToken() -> String {
    let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    let bytes = TunnelCrypto.random(32)
    var out = ""
    var bits = 0
    var value = 0
    for b in bytes {
        value = value << 8 | Int(b)
        bits += 8
        while bits >= 6 {
            bits -= 6
            out.append(alphabet[(value >> bits) & 63])
        }
    }
    if bits > 0 { out.append(alphabet[(value << (6 - bits)) & 63]) }
    return out
}

/// Whether a string is a numeric IPv4 or IPv6 address.
public enum SocketAddressCheck {
    public static func isNumeric(_ host: String) -> Bool {
        SocketAddress(numericHost: host, port: 0) != nil
    }
}

/// A buffer of CSPRNG output handed out once, never twice.
private struct RandomPool: ~Copyable {
    private var bytes = [UInt8](repeating: 0, count: 4096)
    private var used = 4096

    static let shared = Mutex(RandomPool())

    mutating func take(_ count: Int) -> [UInt8] {
        if count > bytes.count {
            var out = [UInt8](repeating: 0, count: count)
            precondition(RAND_bytes(&out, Int32(count)) == 1, "RAND_bytes failed")
            return out
        }
        if used + count > bytes.count {
            precondition(RAND_bytes(&bytes, Int32(bytes.count)) == 1, "RAND_bytes failed")
            used = 0
        }
        let out = Array(bytes[used..<(used + count)])
        for i in used..<(used + count) { bytes[i] = 0 }
        used += count
        return out
    }
}
