/// RFC 6455 frames: the header codec, masking and close codes. Pure functions over bytes;
/// `WebSocketStream` drives them on a connection.
public enum WebSocketFrame {
    /// The opcodes of RFC 6455 section 5.2; any other value is a protocol error.
    public enum Opcode: UInt8, Sendable {
        case continuation = 0x0
        case text = 0x1
        case binary = 0x2
        case close = 0x8
        case ping = 0x9
        case pong = 0xA

        /// Control frames carry at most 125 bytes and are never fragmented.
        public var isControl: Bool { rawValue & 0x8 != 0 }
    }

    /// The most payload a control frame may carry.
    public static let maxControlPayload = 125
    /// The longest header: 2 bytes, a 64-bit length, a 4-byte masking key.
    public static let maxHeaderLength = 14

    /// One frame's header as it stands on the wire.
    public struct Header: Equatable, Sendable {
        public var fin: Bool
        public var opcode: Opcode
        /// The masking key (a client's frames carry one, a server's never do).
        public var mask: UInt32?
        public var length: UInt64

        public init(fin: Bool = true, opcode: Opcode, mask: UInt32? = nil, length: UInt64) {
            self.fin = fin
            self.opcode = opcode
            self.mask = mask
            self.length = length
        }

        /// Bytes the encoded header takes: the shortest length form that fits (RFC 6455 requires it).
        public var encodedLength: Int {
            let lengthBytes = length < 126 ? 0 : length <= 0xFFFF ? 2 : 8
            return 2 + lengthBytes + (mask == nil ? 0 : 4)
        }

        /// Writes the header at `out` (room for `encodedLength` bytes); returns its length.
        @discardableResult
        public func encode(into out: UnsafeMutableRawPointer) -> Int {
            let bytes = out.assumingMemoryBound(to: UInt8.self)
            bytes[0] = (fin ? 0x80 : 0) | opcode.rawValue
            let maskBit: UInt8 = mask == nil ? 0 : 0x80
            var at = 2
            if length < 126 {
                bytes[1] = maskBit | UInt8(length)
            } else if length <= 0xFFFF {
                bytes[1] = maskBit | 126
                bytes[2] = UInt8(length >> 8)
                bytes[3] = UInt8(length & 0xFF)
                at = 4
            } else {
                bytes[1] = maskBit | 127
                for i in 0..<8 { bytes[2 + i] = UInt8((length >> (56 - 8 * UInt64(i))) & 0xFF) }
                at = 10
            }
            if let mask {
                for i in 0..<4 { bytes[at + i] = UInt8((mask >> (24 - 8 * UInt32(i))) & 0xFF) }
                at += 4
            }
            return at
        }

        public var encoded: [UInt8] {
            var out = [UInt8](repeating: 0, count: encodedLength)
            out.withUnsafeMutableBytes { _ = encode(into: $0.baseAddress!) }
            return out
        }
    }

    /// What `parse` found at the start of a byte run.
    public enum Parsed: Equatable, Sendable {
        /// A complete header of `size` bytes.
        case header(Header, size: Int)
        /// Not enough bytes yet for the whole header.
        case needMore
        /// A header no endpoint may send: close the connection with this code.
        case invalid(CloseCode, String)
    }

    /// Decodes the header at the start of `bytes`, checking what RFC 6455 requires of
    /// every frame: no reserved bits (no extension is negotiated), a known opcode, a
    /// 64-bit length with its top bit clear, control frames unfragmented and short.
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> Parsed {
        guard bytes.count >= 2 else { return .needMore }
        let first = bytes[0], second = bytes[1]
        if first & 0x70 != 0 { return .invalid(.protocolError, "reserved bits set") }
        guard let opcode = Opcode(rawValue: first & 0x0F) else {
            return .invalid(.protocolError, "unknown opcode \(first & 0x0F)")
        }
        let masked = second & 0x80 != 0
        var size = 2
        var length = UInt64(second & 0x7F)
        if length == 126 {
            guard bytes.count >= 4 else { return .needMore }
            length = UInt64(bytes[2]) << 8 | UInt64(bytes[3])
            size = 4
        } else if length == 127 {
            guard bytes.count >= 10 else { return .needMore }
            length = 0
            for i in 0..<8 { length = length << 8 | UInt64(bytes[2 + i]) }
            if length >> 63 != 0 { return .invalid(.protocolError, "frame length has its top bit set") }
            size = 10
        }
        var mask: UInt32?
        if masked {
            guard bytes.count >= size + 4 else { return .needMore }
            mask = bytes[size..<size + 4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            size += 4
        }
        let fin = first & 0x80 != 0
        if opcode.isControl {
            if !fin { return .invalid(.protocolError, "fragmented control frame") }
            if length > UInt64(maxControlPayload) { return .invalid(.protocolError, "control frame longer than 125 bytes") }
        }
        return .header(Header(fin: fin, opcode: opcode, mask: mask, length: length), size: size)
    }

    /// XORs `count` bytes at `data` with `key`, starting `phase` bytes into the key
    /// (a payload unmasked in pieces carries its phase from piece to piece). Masking and
    /// unmasking are the same operation.
    public static func applyMask(_ key: UInt32, to data: UnsafeMutableRawPointer, count: Int, phase: Int = 0) {
        copyMasked(key, from: data, to: data, count: count, phase: phase)
    }

    /// Writes `count` bytes from `source` to `destination` XORed with `key` from `phase`
    /// on: one pass, eight bytes at a time, for a frame copied into a send queue or out of
    /// a read buffer. `source` and `destination` may be the same.
    public static func copyMasked(_ key: UInt32, from source: UnsafeRawPointer, to destination: UnsafeMutableRawPointer,
                                  count: Int, phase: Int = 0) {
        guard count > 0 else { return }
        // The key as it lies in memory from `phase` on, repeated over a 64-bit word.
        let inMemory = withUnsafeBytes(of: key.bigEndian) { $0.loadUnaligned(as: UInt32.self) }
        let shift = UInt32(phase & 3) * 8
        let fromPhase = UInt32(littleEndian: inMemory).rotatedRight(by: shift)
        let word = UInt64(littleEndian: UInt64(fromPhase) | UInt64(fromPhase) << 32)
        var i = 0
        while i + 8 <= count {
            (destination + i).storeBytes(of: (source + i).loadUnaligned(as: UInt64.self) ^ word, as: UInt64.self)
            i += 8
        }
        let from = source.assumingMemoryBound(to: UInt8.self)
        let to = destination.assumingMemoryBound(to: UInt8.self)
        let tail = UInt64(littleEndian: word)
        while i < count {
            to[i] = from[i] ^ UInt8(truncatingIfNeeded: tail >> (UInt64(i & 7) * 8))
            i += 1
        }
    }

    /// A whole frame: header then payload, masked when `mask` is given.
    public static func encode(_ opcode: Opcode, payload: [UInt8], mask: UInt32? = nil, fin: Bool = true) -> [UInt8] {
        let header = Header(fin: fin, opcode: opcode, mask: mask, length: UInt64(payload.count))
        var out = header.encoded
        let start = out.count
        out += payload
        if let mask {
            out.withUnsafeMutableBytes { applyMask(mask, to: $0.baseAddress! + start, count: payload.count) }
        }
        return out
    }

    /// A close frame's payload: the code, big-endian, then a UTF-8 reason.
    public static func closePayload(_ code: CloseCode, reason: String = "") -> [UInt8] {
        [UInt8(code.rawValue >> 8), UInt8(code.rawValue & 0xFF)] + Array(reason.utf8.prefix(maxControlPayload - 2))
    }

    /// What a received close frame says: nil code for an empty payload; `.invalid` for a
    /// one-byte payload, a code no endpoint may send, or a reason that is not UTF-8.
    public enum ReceivedClose: Equatable, Sendable {
        case code(UInt16?)
        case invalid
    }

    public static func parseClose(_ payload: [UInt8]) -> ReceivedClose {
        if payload.isEmpty { return .code(nil) }
        guard payload.count >= 2 else { return .invalid }
        let code = UInt16(payload[0]) << 8 | UInt16(payload[1])
        // The reason must be UTF-8 (RFC 6455 section 5.5.1); a peer that sends another
        // encoding is broken, and its close is a protocol error like a bad code.
        guard CloseCode.isSendable(code), String(validating: payload[2...], as: UTF8.self) != nil else { return .invalid }
        return .code(code)
    }
}

/// Close status codes (RFC 6455 section 7.4.1) culvert sends.
public enum CloseCode: UInt16, Sendable {
    case normal = 1000
    case goingAway = 1001
    case protocolError = 1002
    /// A data type we do not take (text where the bridge carries binary).
    case unsupportedData = 1003
    case messageTooBig = 1009
    case internalError = 1011

    /// Whether a peer may put `code` in a close frame: 1000-1003, 1007-1011 and the
    /// registered and private ranges 3000-4999; never 1004-1006, 1015 or the rest.
    public static func isSendable(_ code: UInt16) -> Bool {
        switch code {
        case 1000...1003, 1007...1014, 3000...4999: return true
        default: return false
        }
    }
}

extension UInt32 {
    /// The bits moved `count` places toward the low end, the low ones coming in on top.
    fileprivate func rotatedRight(by count: UInt32) -> UInt32 {
        count == 0 ? self : self >> count | self << (32 - count)
    }
}
