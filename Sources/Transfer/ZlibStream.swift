import CZlib
import Reactor

/// Deflate compression (level 1 by default: cheap, and most of the gain on text) over
/// another `Duplex` (a tunnel data channel). Every write is
/// compressed and flushed with Z_SYNC_FLUSH, so interactive traffic is never held back
/// waiting for more input; reads inflate what arrives.
///
/// Input that does not compress (already compressed or encrypted data) is sent in
/// stored blocks: when a write of at least `probeMinimum` bytes shrinks by less than
/// 5 %, the next `storedSpan` bytes go out at level 0 (a copy, no match search), then
/// one write is tried at the configured level again. Each failed try doubles the span
/// (up to `maxStoredSpan`); a write that compresses resets it. The receiver needs no
/// signal: stored blocks are ordinary deflate.
///
/// Write contract, as the buffered copier uses it: a write that compressed its input
/// but could not hand all the compressed bytes to the inner stream answers
/// `wouldBlock`; the copier calls again with the same bytes once writable, and that
/// call reports them written as soon as the held output is out.
public final class ZlibStream: Duplex {
    private let inner: Duplex
    private var deflater = z_stream()
    private var inflater = z_stream()
    /// Compressed bytes of the last write, `outOffset` of them handed on.
    private var out: UnsafeMutableRawPointer
    private var outCapacity = ZlibStream.chunk + 1024
    private var outCount = 0
    private var outOffset = 0
    private let level: Int32
    /// Input still to send stored before compression is tried again; 0: compressing.
    private var storedLeft = 0
    private var storedSpan = ZlibStream.firstStoredSpan
    /// Input bytes already compressed into `out` but not yet reported as written.
    private var consumed = 0
    private var input: [UInt8]
    private var inputStart = 0
    private var inputEnd = 0
    private var innerEOF = false
    private var isClosed = false
    private static let chunk = 64 * 1024
    private static let probeMinimum = 4096
    private static let firstStoredSpan = 1 << 20
    private static let maxStoredSpan = 64 << 20
    public private(set) var compressedIn: UInt64 = 0
    public private(set) var compressedOut: UInt64 = 0

    public init(wrapping inner: Duplex, level: Int32 = 1) throws(SystemError) {
        self.inner = inner
        self.level = level
        input = [UInt8](repeating: 0, count: Self.chunk)
        out = .allocate(byteCount: outCapacity, alignment: 16)
        let size = Int32(MemoryLayout<z_stream>.size)
        guard deflateInit_(&deflater, level, zlibVersion(), size) == Z_OK else {
            out.deallocate()
            throw SystemError("deflateInit", errno: 12)
        }
        guard inflateInit_(&inflater, zlibVersion(), size) == Z_OK else {
            deflateEnd(&deflater)
            out.deallocate()
            throw SystemError("inflateInit", errno: 12)
        }
    }

    deinit {
        deflateEnd(&deflater)
        inflateEnd(&inflater)
        out.deallocate()
    }

    /// Whether writes currently go out in stored blocks (incompressible input).
    public var isStoring: Bool { storedLeft > 0 }

    public var fd: Int32 { inner.fd }
    public var writeFD: Int32 { inner.writeFD }
    public var closesDescriptors: Bool { inner.closesDescriptors }
    public var isSpliceable: Bool { false }
    /// Compressed bytes are read and written through memory: never pipes.
    public func attachVirtual(_ handler: EventHandler, tag: UInt8, peerTakesPipes: Bool) -> Bool {
        inner.attachVirtual(handler, tag: tag, peerTakesPipes: false)
    }
    public func pendingError() -> Int32 { inner.pendingError() }
    public var readReady: Bool {
        get { inner.readReady }
        set { inner.readReady = newValue }
    }
    public var writeReady: Bool {
        get { inner.writeReady }
        set { inner.writeReady = newValue }
    }

    // MARK: reading

    public func read(into buffer: UnsafeMutableRawPointer, count: Int) -> IOResult {
        while true {
            if inputStart < inputEnd || !innerEOF {
                let produced = inflateAvailable(into: buffer, count: count)
                if produced < 0 { return .failed(SystemError("inflate", errno: 74 /* EBADMSG */)) }
                if produced > 0 { return .bytes(produced) }
            }
            if innerEOF { return .eof }
            // Nothing decodable buffered: fetch more compressed bytes.
            if inputStart == inputEnd { inputStart = 0; inputEnd = 0 }
            if inputEnd == input.count {
                input.withUnsafeMutableBytes { $0.baseAddress!.copyMemory(from: $0.baseAddress! + inputStart, byteCount: inputEnd - inputStart) }
                inputEnd -= inputStart
                inputStart = 0
            }
            let r = input.withUnsafeMutableBytes { inner.read(into: $0.baseAddress! + inputEnd, count: $0.count - inputEnd) }
            switch r {
            case .bytes(let n):
                inputEnd += n
                compressedIn += UInt64(n)
            case .eof:
                innerEOF = true
                if inputStart == inputEnd { return .eof }
            case .wouldBlock, .failed:
                return r
            }
        }
    }

    /// Inflates buffered input into `buffer`; returns bytes produced, or -1 on corrupt data.
    private func inflateAvailable(into buffer: UnsafeMutableRawPointer, count: Int) -> Int {
        guard inputStart < inputEnd else { return 0 }
        return input.withUnsafeMutableBytes { raw -> Int in
            inflater.next_in = raw.baseAddress!.advanced(by: inputStart).assumingMemoryBound(to: Bytef.self)
            inflater.avail_in = uInt(inputEnd - inputStart)
            inflater.next_out = buffer.assumingMemoryBound(to: Bytef.self)
            inflater.avail_out = uInt(count)
            let rc = inflate(&inflater, Z_SYNC_FLUSH)
            inputStart = inputEnd - Int(inflater.avail_in)
            if rc != Z_OK && rc != Z_BUF_ERROR && rc != Z_STREAM_END { return -1 }
            return count - Int(inflater.avail_out)
        }
    }

    // MARK: writing

    public func write(from buffer: UnsafeRawPointer, count: Int) -> IOResult {
        if consumed == 0 {
            compress(buffer, count)
            consumed = count
        }
        switch flushOut() {
        case .bytes:
            let n = consumed
            consumed = 0
            return .bytes(n)
        case let other:
            return other
        }
    }

    private func compress(_ buffer: UnsafeRawPointer, _ count: Int) {
        outCount = 0
        outOffset = 0
        var probing = storedLeft == 0
        if !probing {
            storedLeft = max(0, storedLeft - count)
            if storedLeft == 0 {
                // The span is used up: this write tries the configured level again.
                setLevel(level)
                probing = true
            }
        }
        deflater.next_in = UnsafeMutablePointer(mutating: buffer.assumingMemoryBound(to: Bytef.self))
        deflater.avail_in = uInt(count)
        // Stored blocks add 5 bytes per 64 KiB at most; the flush marker a few more.
        reserveOut(count + count / 8 + 64)
        repeat {
            if outCount == outCapacity { reserveOut(outCapacity) }
            deflater.next_out = (out + outCount).assumingMemoryBound(to: Bytef.self)
            deflater.avail_out = uInt(outCapacity - outCount)
            _ = deflate(&deflater, Z_SYNC_FLUSH)
            outCount = outCapacity - Int(deflater.avail_out)
        } while deflater.avail_out == 0
        guard probing && count >= Self.probeMinimum else { return }
        if outCount * 20 > count * 19 {
            storedLeft = storedSpan
            storedSpan = min(storedSpan * 2, Self.maxStoredSpan)
            setLevel(0)
        } else {
            storedSpan = Self.firstStoredSpan
        }
    }

    /// Room for `extra` more compressed bytes after `outCount`.
    private func reserveOut(_ extra: Int) {
        guard outCount + extra > outCapacity else { return }
        growBuffer(&out, capacity: &outCapacity, keeping: outCount, toFit: outCount + extra)
    }

    /// Changes the compression level between writes. Everything written so far was
    /// flushed, so deflateParams has no pending input to compress with the old level;
    /// whatever it emits still goes out first.
    private func setLevel(_ newLevel: Int32) {
        reserveOut(64)
        deflater.next_in = nil
        deflater.avail_in = 0
        deflater.next_out = (out + outCount).assumingMemoryBound(to: Bytef.self)
        deflater.avail_out = uInt(outCapacity - outCount)
        _ = deflateParams(&deflater, newLevel, Z_DEFAULT_STRATEGY)
        outCount = outCapacity - Int(deflater.avail_out)
    }

    /// Writes held compressed bytes; `.bytes(0)` when everything is out.
    private func flushOut() -> IOResult {
        while outOffset < outCount {
            let r = inner.write(from: out + outOffset, count: outCount - outOffset)
            switch r {
            case .bytes(let n):
                outOffset += n
                compressedOut += UInt64(n)
            case .wouldBlock, .eof, .failed:
                return r
            }
        }
        return .bytes(0)
    }

    public func shutdownWrite() -> SystemError? {
        if case .failed(let e) = flushOut() { return e }
        return inner.shutdownWrite()
    }

    public func close(reset: Bool) {
        guard !isClosed else { return }
        isClosed = true
        inner.close(reset: reset)
    }
}
