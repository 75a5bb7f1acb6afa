#if canImport(Glibc)
import Glibc
#endif
import COpenSSL
import Reactor

/// A WebSocket (RFC 6455, after the upgrade) over another `Duplex`, carrying a byte
/// stream as binary messages: what the copier writes goes out as one binary frame per
/// write call; the payload of binary messages is what reads return.
///
/// - A client masks every frame it sends and refuses masked frames; a server refuses
///   unmasked ones. Any violation sends a close frame with its code (1002, 1003 for
///   text, 1009 for a message over `maxMessage`), then fails reads; closing afterwards
///   ends the connection with FIN, not RST, so the peer gets the close frame.
/// - Fragmented messages are taken; pings are answered with pongs between frames.
/// - Half-close maps to the close handshake: `shutdownWrite` sends a close frame
///   (1000) and reading goes on; the peer's close frame is EOF to the reader.
/// - Keepalive (`startKeepalive`): a ping every interval; a ping unanswered by the
///   next tick calls the owner's timeout.
///
/// Write contract, as for `TLSStream` and `ZlibStream`: a write whose frame the inner
/// stream did not take whole answers `wouldBlock` and holds it; the caller calls again
/// with the same bytes, and that call reports them once the frame is out. A write
/// never reports more bytes than it was given.
///
/// Thread confinement: the loop of the relay that owns it.
public final class WebSocketStream: Duplex {
    /// Which end of the connection this is: it decides who masks.
    public enum Role: Sendable { case client, server }

    /// Limits and timers both ends share.
    public struct Settings: Equatable, Sendable {
        /// The largest message taken, across its fragments.
        public var maxMessage: Int
        /// Ping interval (and pong deadline); nil: no keepalive.
        public var pingInterval: Duration?

        public static let defaultMaxMessage = 16 << 20
        public static let defaultPingInterval = Duration.seconds(20)

        public init(maxMessage: Int = Settings.defaultMaxMessage, pingInterval: Duration? = Settings.defaultPingInterval) {
            self.maxMessage = maxMessage
            self.pingInterval = pingInterval
        }
    }

    /// What the reader expects next.
    private enum Reader {
        /// A frame header (a control frame is read whole from here).
        case header
        /// `left` payload bytes of a data frame; `phase` is how far into the mask key.
        case payload(left: UInt64, mask: UInt32?, phase: Int, fin: Bool)
        /// The peer's close frame arrived: reads answer EOF.
        case closed
        case failed(SystemError)
    }

    /// Where the writer stands: open, or its close frame queued (nothing may follow it).
    private enum Writer { case open, closeSent }

    /// Payload bytes per data frame at most (a write call's worth of the copier).
    static let maxFramePayload = 64 * 1024

    private let inner: Duplex
    private let role: Role
    private let maxMessage: Int
    private var reader = Reader.header
    private var writer = Writer.open
    /// Bytes of the message being received, once its first frame has arrived.
    private var message: UInt64?
    /// A violation sent its close frame: closing must not reset it away.
    private var violated = false

    private var input: UnsafeMutableRawPointer
    private let inputCapacity = WebSocketStream.maxFramePayload + WebSocketFrame.maxHeaderLength
    private var inputStart = 0
    private var inputEnd = 0

    /// Whole frames waiting for the inner stream, `outStart` of them gone already.
    private var out: UnsafeMutableRawPointer
    private var outCapacity = WebSocketStream.maxFramePayload + 64
    private var outStart = 0
    private var outEnd = 0
    /// Payload bytes of a queued data frame not yet reported written.
    private var held = 0

    /// Random bytes for masking keys, drawn in batches (a client draws one key per frame).
    private var keyPool = [UInt8](repeating: 0, count: 256)
    private var keyPoolUsed = 256

    private var keepalive: LoopTimer?
    /// The interval `startLayerKeepalive` uses (nil: none).
    private let pingInterval: Duration?
    private var awaitingPong = false
    private var isClosed = false

    /// The close code the peer sent (nil: none yet, or a close without a code).
    public private(set) var peerCloseCode: UInt16?
    /// The close code we sent, once we did.
    public private(set) var sentCloseCode: CloseCode?

    /// - Parameter leftover: bytes read past the upgrade's head, taken before the inner stream's.
    public init(wrapping inner: Duplex, role: Role, settings: Settings = Settings(), leftover: [UInt8] = []) {
        self.inner = inner
        self.role = role
        maxMessage = settings.maxMessage
        pingInterval = settings.pingInterval
        input = .allocate(byteCount: inputCapacity, alignment: 16)
        out = .allocate(byteCount: outCapacity, alignment: 16)
        precondition(leftover.count <= inputCapacity, "more bytes after the upgrade than one read takes")
        leftover.withUnsafeBytes { if let base = $0.baseAddress { input.copyMemory(from: base, byteCount: $0.count) } }
        inputEnd = leftover.count
    }

    deinit {
        keepalive?.cancel()
        input.deallocate()
        out.deallocate()
    }

    public var fd: Int32 { inner.fd }
    public var writeFD: Int32 { inner.writeFD }
    public var closesDescriptors: Bool { inner.closesDescriptors }
    public var isSpliceable: Bool { false }
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
        guard count > 0 else { return .bytes(0) }
        // Pongs and a close answer queued by earlier reads go out as the socket allows.
        _ = flushOut()
        while true {
            switch reader {
            case .closed:
                return .eof
            case .failed(let e):
                return .failed(e)
            case .payload(let left, let mask, let phase, let fin):
                if left == 0 {
                    reader = .header
                    if fin { message = nil }
                    continue
                }
                let want = Int(min(left, UInt64(count)))
                let n: Int
                if inputEnd > inputStart {
                    n = min(want, inputEnd - inputStart)
                    buffer.copyMemory(from: input + inputStart, byteCount: n)
                    inputStart += n
                } else {
                    // Payload straight into the caller's buffer, no staging copy.
                    switch inner.read(into: buffer, count: want) {
                    case .bytes(let got): n = got
                    case .eof: return fail(SystemError("websocket: connection closed without a close frame", errno: ECONNRESET))
                    case let other: return other
                    }
                }
                if let mask { WebSocketFrame.applyMask(mask, to: buffer, count: n, phase: phase) }
                reader = .payload(left: left - UInt64(n), mask: mask, phase: (phase + n) & 3, fin: fin)
                return .bytes(n)
            case .header:
                let parsed = WebSocketFrame.parse(UnsafeRawBufferPointer(start: input + inputStart, count: inputEnd - inputStart))
                switch parsed {
                case .needMore:
                    if let r = fill() { return r }
                case .invalid(let code, let why):
                    return violation(code, why)
                case .header(let header, let size):
                    if let r = take(header, size: size) { return r }
                }
            }
        }
    }

    /// Starts on a frame whose header is complete; nil to go on reading, else what read answers.
    private func take(_ header: WebSocketFrame.Header, size: Int) -> IOResult? {
        switch (role, header.mask) {
        case (.server, nil): return violation(.protocolError, "unmasked frame from a client")
        case (.client, .some): return violation(.protocolError, "masked frame from a server")
        default: break
        }
        if header.opcode.isControl {
            let whole = size + Int(header.length)
            guard inputEnd - inputStart >= whole else { return fill() }
            var payload = [UInt8](UnsafeRawBufferPointer(start: input + inputStart + size, count: Int(header.length)))
            inputStart += whole
            if let mask = header.mask {
                payload.withUnsafeMutableBytes { WebSocketFrame.applyMask(mask, to: $0.baseAddress!, count: $0.count) }
            }
            return control(header.opcode, payload)
        }
        switch (header.opcode, message) {
        case (.text, _):
            return violation(.unsupportedData, "text frame where binary is carried")
        case (.continuation, nil):
            return violation(.protocolError, "continuation frame outside a message")
        case (.binary, .some):
            return violation(.protocolError, "new message inside a fragmented one")
        default:
            break
        }
        let total = (message ?? 0) + header.length
        if total > UInt64(maxMessage) {
            return violation(.messageTooBig, "message longer than \(maxMessage) bytes")
        }
        message = total
        inputStart += size
        reader = .payload(left: header.length, mask: header.mask, phase: 0, fin: header.fin)
        return nil
    }

    private func control(_ opcode: WebSocketFrame.Opcode, _ payload: [UInt8]) -> IOResult? {
        switch opcode {
        case .ping:
            if case .open = writer { queue(.pong, payload) }
            _ = flushOut()
        case .pong:
            awaitingPong = false
        case .close:
            guard case .code(let code) = WebSocketFrame.parseClose(payload) else {
                return violation(.protocolError, "invalid close frame")
            }
            peerCloseCode = code
            reader = .closed
            stopKeepalive()
            return .eof
        default:
            break
        }
        return nil
    }

    /// Reads more bytes from the inner stream behind what is buffered; nil when some came.
    private func fill() -> IOResult? {
        if inputStart == inputEnd {
            inputStart = 0
            inputEnd = 0
        } else if inputEnd == inputCapacity {
            // A header (or a short control frame) straddles the end: move it to the front.
            input.copyMemory(from: input + inputStart, byteCount: inputEnd - inputStart)
            inputEnd -= inputStart
            inputStart = 0
        }
        switch inner.read(into: input + inputEnd, count: inputCapacity - inputEnd) {
        case .bytes(let n):
            inputEnd += n
            return nil
        case .eof:
            return fail(SystemError("websocket: connection closed without a close frame", errno: ECONNRESET))
        case let other:
            return other
        }
    }

    private func fail(_ error: SystemError) -> IOResult {
        reader = .failed(error)
        return .failed(error)
    }

    /// Sends a close frame with `code` (unless one went already) and fails reading.
    private func violation(_ code: CloseCode, _ why: String) -> IOResult {
        if case .open = writer {
            queue(.close, WebSocketFrame.closePayload(code, reason: why))
            writer = .closeSent
            sentCloseCode = code
            violated = true
            stopKeepalive()
            _ = flushOut()
        }
        return fail(SystemError("websocket: \(why) (close \(code.rawValue))", errno: EPROTO))
    }

    // MARK: writing

    public func write(from buffer: UnsafeRawPointer, count: Int) -> IOResult {
        guard case .open = writer else { return .failed(SystemError("websocket: write after close", errno: EPIPE)) }
        if held == 0 {
            let n = min(count, Self.maxFramePayload)
            queue(.binary, UnsafeRawBufferPointer(start: buffer, count: n))
            held = n
        }
        precondition(count >= held, "a retried write must offer the bytes it held")
        switch flushOut() {
        case .bytes:
            defer { held = 0 }
            return .bytes(held)
        case let other:
            return other
        }
    }

    private func queue(_ opcode: WebSocketFrame.Opcode, _ payload: [UInt8]) {
        payload.withUnsafeBytes { queue(opcode, $0) }
    }

    /// Appends one whole frame behind what is queued: frames never interleave inside each other.
    private func queue(_ opcode: WebSocketFrame.Opcode, _ payload: UnsafeRawBufferPointer) {
        let mask = role == .client ? nextMaskKey() : nil
        let header = WebSocketFrame.Header(opcode: opcode, mask: mask, length: UInt64(payload.count))
        let needed = header.encodedLength + payload.count
        if outStart == outEnd {
            outStart = 0
            outEnd = 0
        }
        if outEnd + needed > outCapacity {
            out.copyMemory(from: out + outStart, byteCount: outEnd - outStart)
            outEnd -= outStart
            outStart = 0
            if outEnd + needed > outCapacity { growBuffer(&out, capacity: &outCapacity, keeping: outEnd, toFit: outEnd + needed) }
        }
        outEnd += header.encode(into: out + outEnd)
        if let base = payload.baseAddress { (out + outEnd).copyMemory(from: base, byteCount: payload.count) }
        if let mask { WebSocketFrame.applyMask(mask, to: out + outEnd, count: payload.count) }
        outEnd += payload.count
    }

    private func nextMaskKey() -> UInt32 {
        if keyPoolUsed + 4 > keyPool.count {
            _ = RAND_bytes(&keyPool, Int32(keyPool.count))
            keyPoolUsed = 0
        }
        defer { keyPoolUsed += 4 }
        return keyPool[keyPoolUsed..<keyPoolUsed + 4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    }

    /// Writes queued frames; `.bytes(0)` once all are out.
    private func flushOut() -> IOResult {
        while outStart < outEnd {
            switch inner.write(from: out + outStart, count: outEnd - outStart) {
            case .bytes(let n): outStart += n
            case let other: return other
            }
        }
        return .bytes(0)
    }

    public var bufferedOutput: Int { held == 0 ? outEnd - outStart : 0 }

    public func flushBuffered() -> IOResult { flushOut() }

    // MARK: keepalive

    /// Pings the peer every `interval` on `loop`; when a ping is still unanswered at the
    /// next one, calls `onTimeout` (the owner ends the connection). Stops with the close
    /// handshake or `close`.
    public func startKeepalive(on loop: EventLoop, interval: Duration, onTimeout: @escaping () -> Void) {
        loop.assertInLoop()
        awaitingPong = false
        keepalive = loop.schedule(after: interval) { [weak self] in self?.tick(loop: loop, interval: interval, onTimeout: onTimeout) }
    }

    private func tick(loop: EventLoop, interval: Duration, onTimeout: @escaping () -> Void) {
        guard let timer = keepalive, case .open = writer, isReading else { return stopKeepalive() }
        if awaitingPong {
            stopKeepalive()
            return onTimeout()
        }
        awaitingPong = true
        queue(.ping, [])
        _ = flushOut()
        loop.reschedule(timer, after: interval)
    }

    /// Whether the peer may still send frames (no close from it, no failure).
    private var isReading: Bool {
        switch reader {
        case .header, .payload: return true
        case .closed, .failed: return false
        }
    }

    private func stopKeepalive() {
        keepalive?.cancel()
        keepalive = nil
    }

    // MARK: ending

    /// Our side's EOF: the close frame (1000). Reading goes on until the peer's close.
    public func shutdownWrite() -> SystemError? {
        sendClose(.normal)
        if case .failed(let e) = flushOut() { return e }
        return nil
    }

    /// The layer above's last bytes (TLS's close_notify) and the close frame in one send:
    /// sent apart, a peer that read the first could finish and close before the second
    /// arrived, and the close frame landing on its closed socket drew a reset.
    func shutdownWrite(after last: UnsafeRawBufferPointer) -> SystemError? {
        if case .open = writer, last.count > held {
            // A held frame carries the first `held` of these bytes already.
            queue(.binary, UnsafeRawBufferPointer(rebasing: last[held...]))
        }
        held = 0
        return shutdownWrite()
    }

    private func sendClose(_ code: CloseCode) {
        guard case .open = writer else { return }
        queue(.close, WebSocketFrame.closePayload(code))
        writer = .closeSent
        sentCloseCode = code
        stopKeepalive()
    }

    public func close(reset: Bool) {
        guard !isClosed else { return }
        isClosed = true
        stopKeepalive()
        if reset && !violated { return inner.close(reset: true) }
        sendClose(.normal)
        _ = flushOut()
        discardInput()
        inner.close(reset: false)
    }

    /// Reads at most this many buffers' worth when closing; a peer still streaming past
    /// that gets the reset it asks for.
    private static let discardReads = 16

    /// Reads and drops what arrived and nobody will read: the peer's close frame, at
    /// least, waits behind the last record a TLS layer above took as its EOF. Closing a
    /// socket with unread bytes sends RST instead of FIN, and a peer that gets RST drops
    /// what it received and has not read yet (a relay aborts on the error it reports):
    /// the end of an echo never reached its visitor.
    private func discardInput() {
        inputStart = 0
        inputEnd = 0
        for _ in 0..<Self.discardReads {
            guard case .bytes = inner.read(into: input, count: inputCapacity) else { return }
        }
    }
}

/// A carrier whose half-close is a message of its own (a WebSocket's close frame),
/// taking the layer above's last bytes along so that both leave together.
protocol HalfClosingCarrier: Duplex {
    /// Sends `last` (bytes the layer above has not had reported written, from the
    /// start) and then the end of this side; everything of `last` counts as taken.
    func shutdownWrite(after last: UnsafeRawBufferPointer) -> SystemError?
}

extension WebSocketStream: HalfClosingCarrier {}

extension WebSocketStream: LayerKeepalive {
    public func startLayerKeepalive(on loop: EventLoop) {
        guard keepalive == nil, !isClosed, let interval = pingInterval else { return }
        let fd = self.fd
        startKeepalive(on: loop, interval: interval) { _ = shutdown(fd, Int32(SHUT_RDWR)) }
    }

    public func stopLayerKeepalive() { stopKeepalive() }
}
