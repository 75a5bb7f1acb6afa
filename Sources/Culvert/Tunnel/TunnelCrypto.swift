#if canImport(Glibc)
import Glibc
#endif
import COpenSSL
import Transfer

/// The few primitives the tunnel's authentication needs, from OpenSSL.
enum TunnelCrypto {
    static func hmacSHA256(key: [UInt8], _ parts: [UInt8]...) -> [UInt8] {
        var message: [UInt8] = []
        for p in parts { message += p }
        var out = [UInt8](repeating: 0, count: 32)
        var len: UInt32 = 32
        _ = HMAC(EVP_sha256(), key, Int32(key.count), message, message.count, &out, &len)
        return out
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

    static func random(_ count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        precondition(RAND_bytes(&out, Int32(count)) == 1, "RAND_bytes failed")
        return out
    }

    /// Compares in time independent of where the inputs differ.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        return CRYPTO_memcmp(a, b, a.count) == 0
    }
}

/// The secrets one token gives: an auth key for the handshake proofs and a TLS PSK,
/// derived apart so neither reveals the other.
struct TokenKeys {
    let auth: [UInt8]
    let tlsPSK: [UInt8]

    init(token: String) {
        let secret = Array(token.utf8)
        auth = TunnelCrypto.hkdf(secret: secret, info: "culvert/1 auth")
        tlsPSK = TunnelCrypto.hkdf(secret: secret, info: "culvert/1 tls external psk")
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
