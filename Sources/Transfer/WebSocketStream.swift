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
/// - A data frame leaves straight from the writer's bytes when nothing needs masking
///   (header and payload in one sendmsg, or encrypted in place by a TLS layer under it);
///   a client's frames are masked while copied into the send queue, in one pass.
/// - Half-close maps to the close handshake: `shutdownWrite` sends a close frame
///   (1000) and reading goes on; the peer's close frame is EOF to the reader.
/// - Keepalive (`startKeepalive`): a ping every interval; a ping unanswered by the
///   next tick calls the owner's timeout, unless received bytes wait unread: a reader
///   held back by a slow destination cannot see the pong, nor the peer's pings, so it
///   sends an unsolicited pong (RFC 6455 5.5.3, a heartbeat) to keep the peer's
///   keepalive content instead.
/// - A graceful close that finds the socket full keeps the connection a short while
///   (`lingerLimit`, retried on the loop's timer, never blocking it) so the last frames
///   and the close frame still leave; a reset close drops them.
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

    /// Payload bytes per data frame at most: a write call's worth of the copier, or the
    /// records a TLS layer above flushes at once, go out as one frame.
    static let maxFramePayload = 256 * 1024
    /// Received bytes one read of the inner stream takes at most.
    static let inputCapacity = 64 * 1024 + WebSocketFrame.maxHeaderLength
    /// After a data frame this long, the next header is read on its own (with at most a
    /// control frame's worth behind it), so the bulk of the next payload is read
    /// straight into the caller's buffer instead of through the input buffer.
    static let bulkFrame: UInt64 = 16 * 1024
    /// What a header read takes after a bulk frame: the longest header and control frame.
    static let headerRead = WebSocketFrame.maxHeaderLength + WebSocketFrame.maxControlPayload
    /// How long a graceful close may wait for a full socket to take the last frames.
    static let lingerLimit = Duration.seconds(2)

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
    private let inputCapacity = WebSocketStream.inputCapacity
    private var inputStart = 0
    private var inputEnd = 0
    /// The last data frame was long: read the next header on its own.
    private var bulk = false

    /// Whole frames waiting for the inner stream, `outStart` of them gone already.
    private var out: UnsafeMutableRawPointer
    private var outCapacity = 64 * 1024
    private var outStart = 0
    private var outEnd = 0
    /// Payload bytes of a data frame on its way (queued here or in the inner stream's
    /// buffer) not yet reported written.
    private var held = 0
    /// Where the held frame lies in `out` (empty when it is not queued here): what
    /// `bufferedOutput` leaves out, since those bytes are not reported written yet.
    private var heldFrame = 0..<0
    /// A frame header encoded for a frame that leaves without a copy, followed by the
    /// header of the layer above when it hands one over (`writeThrough`).
    private let header = UnsafeMutableRawPointer.allocate(byteCount: WebSocketStream.headerRoom, alignment: 8)
    /// Room for our header and one of the layer above (a multiplexer's frame header).
    private static let headerRoom = 64

    /// Random bytes for masking keys, drawn in batches (a client draws one key per frame).
    private var keyPool = [UInt8](repeating: 0, count: 256)
    private var keyPoolUsed = 256

    private var keepalive: LoopTimer?
    /// The loop the owner runs the stream on, once it said (`startLayerKeepalive`): a
    /// lingering close retries on its timer.
    private var home: EventLoop?
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
        input = .allocate(byteCount: Self.inputCapacity, alignment: 16)
        out = .allocate(byteCount: outCapacity, alignment: 16)
        precondition(leftover.count <= Self.inputCapacity, "more bytes after the upgrade than one read takes")
        leftover.withUnsafeBytes { if let base = $0.baseAddress { input.copyMemory(from: base, byteCount: $0.count) } }
        inputEnd = leftover.count
    }

    deinit {
        keepalive?.cancel()
        input.deallocate()
        out.deallocate()
        header.deallocate()
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
                var n = 0
                if inputEnd > inputStart {
                    n = min(want, inputEnd - inputStart)
                    if let mask {
                        WebSocketFrame.copyMasked(mask, from: input + inputStart, to: buffer, count: n, phase: phase)
                    } else {
                        buffer.copyMemory(from: input + inputStart, byteCount: n)
                    }
                    inputStart += n
                }
                if n < want {
                    // The rest straight into the caller's buffer, no staging copy.
                    switch inner.read(into: buffer + n, count: want - n) {
                    case .bytes(let got):
                        if let mask { WebSocketFrame.applyMask(mask, to: buffer + n, count: got, phase: phase + n) }
                        n += got
                    case .eof:
                        return fail(SystemError("websocket: connection closed without a close frame", errno: ECONNRESET))
                    case let other:
                        // What came from the buffer is reported now; the stream says the rest next time.
                        if n == 0 { return other }
                    }
                }
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
        bulk = header.length >= Self.bulkFrame
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
        let room = inputCapacity - inputEnd
        switch inner.read(into: input + inputEnd, count: bulk && inputStart == inputEnd ? min(room, Self.headerRead) : room) {
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
            held = n
            if let early = send(UnsafeRawBufferPointer(start: buffer, count: n)) {
                if case .failed = early { released() }
                return early
            }
        }
        precondition(count >= held, "a retried write must offer the bytes it held")
        switch flushOut() {
        case .bytes:
            defer { released() }
            return .bytes(held)
        case let other:
            return other
        }
    }

    /// The held frame is out (or its write failed): nothing is held any more.
    private func released() {
        held = 0
        heldFrame = 0..<0
    }

    /// Puts the data frame of `payload` on its way. Unmasked and with nothing queued
    /// ahead, it leaves without a copy: header and payload in one sendmsg on a socket,
    /// or encrypted straight from the caller's bytes by a TLS layer under us; what a
    /// socket does not take is queued. nil: go on flushing; else what the write answers.
    private func send(_ payload: UnsafeRawBufferPointer) -> IOResult? {
        guard role == .server, outStart == outEnd, let base = payload.baseAddress else {
            queueFrame(payload)
            return nil
        }
        let headerCount = WebSocketFrame.Header(opcode: .binary, length: UInt64(payload.count)).encode(into: header)
        return sendDirect(headerCount, base, payload.count) { queueFrame(payload) }
    }

    /// Sends the frame whose header (ours, and the layer above's if any) is in `header`
    /// and whose payload, without the layer's header, is `body`; queues the rest. `queueAll`
    /// queues the whole frame when the inner stream takes none of it its own way.
    private func sendDirect(_ headerCount: Int, _ base: UnsafeRawPointer, _ count: Int, queueAll: () -> Void) -> IOResult? {
        let payload = UnsafeRawBufferPointer(start: base, count: count)
        if inner.isSpliceable {
            switch Net.write(inner.writeFD, header: header, headerCount, body: base, payload.count) {
            case .bytes(let n) where n < headerCount:
                queueRest(UnsafeRawBufferPointer(start: header + n, count: headerCount - n), payload)
            case .bytes(let n) where n < headerCount + payload.count:
                queueRest(UnsafeRawBufferPointer(rebasing: payload[(n - headerCount)...]))
            case .bytes:
                break
            case .wouldBlock:
                queueRest(UnsafeRawBufferPointer(start: header, count: headerCount), payload)
                return .wouldBlock
            case .eof:
                return .failed(SystemError("sendmsg", errno: EPIPE))
            case .failed(let e):
                return .failed(e)
            }
            return nil
        }
        // The frame is in the layer's buffer now; `flushOut` waits until it has left.
        switch inner.writeThrough(header: header, headerCount, body: base, count) {
        case .failed(let e)?: return .failed(e)
        case .some: return nil
        case nil: break
        }
        queueAll()
        return nil
    }

    /// A frame of the layer above (a multiplexer's), header and body, as one data frame:
    /// its body is not copied into the layer's queue first. What the inner stream does
    /// not take waits here (`bufferedOutput`), as the protocol asks.
    public func writeThrough(header layerHeader: UnsafeRawPointer, _ layerHeaderCount: Int, body: UnsafeRawPointer,
                             _ bodyCount: Int) -> IOResult? {
        guard case .open = writer, held == 0, layerHeaderCount <= Self.headerRoom - WebSocketFrame.maxHeaderLength else { return nil }
        let layerPart = UnsafeRawBufferPointer(start: layerHeader, count: layerHeaderCount)
        let bodyPart = UnsafeRawBufferPointer(start: body, count: bodyCount)
        let total = layerHeaderCount + bodyCount
        if role == .server && outStart == outEnd {
            let ours = WebSocketFrame.Header(opcode: .binary, length: UInt64(total)).encode(into: header)
            (header + ours).copyMemory(from: layerHeader, byteCount: layerHeaderCount)
            let early = sendDirect(ours + layerHeaderCount, body, bodyCount) { queue(.binary, layerPart, bodyPart) }
            // Nothing is held here: what is queued counts as buffered output.
            heldFrame = 0..<0
            if case .failed(let e)? = early { return .failed(e) }
            return .bytes(total)
        }
        queue(.binary, layerPart, bodyPart)
        if case .failed(let e) = flushOut() { return .failed(e) }
        return .bytes(total)
    }

    /// Queues the held frame whole: a binary frame of `payload`.
    private func queueFrame(_ payload: UnsafeRawBufferPointer) {
        let start = outEnd - outStart
        queue(.binary, payload)
        heldFrame = outStart + start..<outEnd
    }

    /// Queues the unsent rest of the held frame: `parts`, bytes framed already.
    private func queueRest(_ parts: UnsafeRawBufferPointer...) {
        makeRoom(parts.reduce(0) { $0 + $1.count })
        let start = outEnd
        for part in parts where part.count > 0 {
            (out + outEnd).copyMemory(from: part.baseAddress!, byteCount: part.count)
            outEnd += part.count
        }
        heldFrame = start..<outEnd
    }

    private func queue(_ opcode: WebSocketFrame.Opcode, _ payload: [UInt8]) {
        payload.withUnsafeBytes { queue(opcode, $0) }
    }

    /// Appends one whole frame, its payload `first` then `second`, behind what is
    /// queued: frames never interleave inside each other. A client's payload is masked
    /// on its way in.
    private func queue(_ opcode: WebSocketFrame.Opcode, _ first: UnsafeRawBufferPointer,
                       _ second: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0)) {
        let mask = role == .client ? nextMaskKey() : nil
        let length = first.count + second.count
        let frameHeader = WebSocketFrame.Header(opcode: opcode, mask: mask, length: UInt64(length))
        makeRoom(frameHeader.encodedLength + length)
        outEnd += frameHeader.encode(into: out + outEnd)
        var phase = 0
        for part in [first, second] {
            guard let base = part.baseAddress else { continue }
            if let mask {
                WebSocketFrame.copyMasked(mask, from: base, to: out + outEnd, count: part.count, phase: phase)
            } else {
                (out + outEnd).copyMemory(from: base, byteCount: part.count)
            }
            outEnd += part.count
            phase = (phase + part.count) & 3
        }
    }

    /// Room for `needed` more bytes at `outEnd`: what is gone moves out of the way first.
    private func makeRoom(_ needed: Int) {
        if outStart == outEnd {
            outStart = 0
            outEnd = 0
            heldFrame = 0..<0
        }
        guard outEnd + needed > outCapacity else { return }
        if outStart > 0 {
            out.copyMemory(from: out + outStart, byteCount: outEnd - outStart)
            heldFrame = max(heldFrame.lowerBound - outStart, 0)..<max(heldFrame.upperBound - outStart, 0)
            outEnd -= outStart
            outStart = 0
        }
        if outEnd + needed > outCapacity { growBuffer(&out, capacity: &outCapacity, keeping: outEnd, toFit: outEnd + needed) }
    }

    private func nextMaskKey() -> UInt32 {
        if keyPoolUsed + 4 > keyPool.count {
            _ = RAND_bytes(&keyPool, Int32(keyPool.count))
            keyPoolUsed = 0
        }
        defer { keyPoolUsed += 4 }
        return keyPool[keyPoolUsed..<keyPoolUsed + 4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    }

    /// Writes queued frames, then what the inner stream buffered of them (or of a frame
    /// it encrypted in place); `.bytes(0)` once all are out.
    private func flushOut() -> IOResult {
        while outStart < outEnd {
            switch inner.write(from: out + outStart, count: outEnd - outStart) {
            case .bytes(let n): outStart += n
            case let other: return other
            }
        }
        if inner.bufferedOutput > 0 { return inner.flushBuffered() }
        return .bytes(0)
    }

    /// Queued bytes that were reported written (pongs, a close frame), not those of a
    /// held frame; and, with nothing held, what the inner stream buffered.
    public var bufferedOutput: Int {
        let heldUnsent = max(0, heldFrame.upperBound - max(heldFrame.lowerBound, outStart))
        return outEnd - outStart - heldUnsent + (held == 0 ? inner.bufferedOutput : 0)
    }

    public func flushBuffered() -> IOResult { flushOut() }

    // MARK: keepalive

    /// Pings the peer every `interval` on `loop`; when a ping is still unanswered at the
    /// next one, calls `onTimeout` (the owner ends the connection). Stops with the close
    /// handshake or `close`.
    public func startKeepalive(on loop: EventLoop, interval: Duration, onTimeout: @escaping () -> Void) {
        loop.assertInLoop()
        home = loop
        awaitingPong = false
        keepalive = loop.schedule(after: interval) { [weak self] in self?.tick(loop: loop, interval: interval, onTimeout: onTimeout) }
    }

    private func tick(loop: EventLoop, interval: Duration, onTimeout: @escaping () -> Void) {
        guard let timer = keepalive, case .open = writer, isReading else { return stopKeepalive() }
        if hasUnreadInput {
            // Our reader is held back: the pong may wait among the unread bytes, and the
            // peer's pings do, so tell the peer we live (bounded: one small frame a tick,
            // only when nothing else waits to be sent).
            if bufferedOutput == 0 && held == 0 { queue(.pong, []) }
        } else if awaitingPong {
            stopKeepalive()
            return onTimeout()
        } else {
            awaitingPong = true
            queue(.ping, [])
        }
        _ = flushOut()
        loop.reschedule(timer, after: interval)
    }

    /// Whether received bytes wait for a reader: frames here, or bytes in the socket.
    private var hasUnreadInput: Bool {
        if inputEnd > inputStart { return true }
        var waiting: Int32 = 0
        return ioctl(inner.fd, UInt(FIONREAD), &waiting) == 0 && waiting > 0
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
        released()
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
        let flushed = flushOut()
        discardInput()
        if case .wouldBlock = flushed, let home {
            return linger(on: home, left: Self.lingerLimit, pause: .milliseconds(5))
        }
        inner.close(reset: false)
    }

    /// Retries the last frames on the loop's timer, pausing longer each time, until they
    /// are out or `left` is spent; the timer holds the stream meanwhile. Reading on
    /// meanwhile keeps a peer that is itself blocked writing to us from waiting on us.
    private func linger(on loop: EventLoop, left: Duration, pause: Duration) {
        loop.schedule(after: pause) { [self] in
            let flushed = flushOut()
            discardInput()
            let rest = left - pause
            if case .wouldBlock = flushed, rest > .zero {
                return linger(on: loop, left: rest, pause: min(pause * 2, .milliseconds(200)))
            }
            inner.close(reset: false)
        }
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
        guard keepalive == nil, !isClosed else { return }
        home = loop
        guard let interval = pingInterval else { return }
        let fd = self.fd
        startKeepalive(on: loop, interval: interval) { _ = shutdown(fd, Int32(SHUT_RDWR)) }
    }

    public func stopLayerKeepalive() {
        stopKeepalive()
        home = nil
    }
}
