#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// Many byte streams over one carrier connection (a tunnel data channel, plain or TLS):
/// each visitor of a tunnel becomes a stream instead of a connection of its own, so a
/// new visitor costs one frame instead of a TCP (and TLS) handshake, and an idle one
/// holds no socket, no TLS state and no buffer.
///
/// Frame (docs/PROTOCOL.md, "Multiplexed data channels"): u8 type, u32 stream id,
/// u32 payload length (big-endian), payload. Types:
/// - `open`: a new stream; the payload says what it is for. The opener (the tunnel
///   server) numbers its streams below 2^31, the acceptor above, so both may open
///   (`acceptsPeerStreams` lets the opener take the acceptor's).
/// - `data`: stream bytes, at most `maxPayload`, never more than the receiver's window.
/// - `eof`: the sender will send no more on this stream (half-close).
/// - `reset`: the stream is aborted both ways.
/// - `window`: payload u32, more bytes the receiver can take on this stream.
///
/// Flow control is per stream: a sender may have at most a window of bytes that the
/// receiving side's reader has not consumed, so one slow reader never stalls the others
/// and the memory a stream can pin is bounded. The window starts at `initialWindow`
/// and doubles, up to `maxWindow`, each time the reader takes a credit step's worth
/// without falling behind: bulk streams get room to run at full speed, while a stream
/// nobody reads pins no more than the initial window. Frames for a stream one side already
/// closed are ignored (they cross a `reset` on the wire).
///
/// On a plain carrier with a pipe pool, the bulk of a large data frame is not copied
/// through user space: once its header is read, the payload still on the carrier is
/// spliced into the stream's pipe, and the stream's relay splices it on to its socket.
/// After such a frame only the next header is read, so the next frame's payload stays
/// on the carrier too; a small frame switches back to reading whole buffers.
///
/// Thread confinement: one loop; streams are driven by the relays of that loop. Public
/// entry points assert it in debug builds.
public final class MuxConnection: EventHandler {
    public enum FrameType: UInt8 {
        case open = 1, data = 2, eof = 3, reset = 4, window = 5
    }

    /// What the next bytes read from the carrier are for.
    private enum Reader {
        /// Frames: read as much as `inBuf` holds.
        case frames
        /// The last frame was bulk for a stream that takes pipes: read just the next
        /// header, so that the payload after it can be spliced.
        case header
        /// The rest of a data frame's payload, taken off the carrier past `inBuf`: its
        /// stream and the payload bytes still to come.
        case payload(stream: UInt32, left: Int)
    }

    /// Where the carrier is in its life.
    private enum Lifecycle {
        case open
        /// `closeWhenIdle`: no new streams; the carrier ends with its last stream.
        case draining
        /// A write to the carrier failed (inside a relay that was writing, or partway
        /// through a frame): nothing more goes out, and the carrier is failed from the
        /// loop at the next flush, not inside that relay.
        case failing(Error)
        case closed

        /// Whether frames may still go out on the carrier.
        var sends: Bool {
            switch self {
            case .open, .draining: true
            case .failing, .closed: false
            }
        }
    }

    public static let headerSize = 9
    /// The most payload a data frame carries.
    public static let maxPayload = 256 * 1024
    /// The most payload any other frame carries (they are read whole into memory).
    public static let maxControlPayload = 64 * 1024
    /// Bytes a new stream may have in flight towards its reader.
    public static let initialWindow = 256 * 1024
    /// The most a stream's window grows to while its reader keeps up.
    public static let maxWindow = 4 << 20
    /// Above this many queued outgoing bytes, stream writes wait for the carrier.
    static let highWater = 512 * 1024
    static let lowWater = 128 * 1024
    /// A queue this long is written at once instead of at the end of the loop iteration.
    static let eagerFlush = 16 * 1024
    private static let inCapacity = 256 * 1024
    /// Bytes read from the carrier per wake-up before yielding to other connections.
    private static let readBudget = 4 << 20
    /// A frame's payload still on the carrier is spliced when at least this long.
    static let spliceMinimum = 8 * 1024

    public let loop: EventLoop
    private let carrier: Duplex
    /// Where streams borrow pipes for spliced payload; nil when the carrier is layered.
    let pipes: PipePool?
    /// The side that opens streams (the tunnel server); the other side accepts them.
    public let isOpener: Bool
    private var registration: Registration?
    private var streams: [UInt32: MuxStream] = [:]
    private var nextID: UInt32 = 1

    private let inBuf: UnsafeMutableRawPointer
    private var inStart = 0
    private var inEnd = 0
    private var out: UnsafeMutableRawPointer
    private var outCapacity = 64 * 1024
    private var outStart = 0
    private var outEnd = 0
    private var reader = Reader.frames
    private var lifecycle = Lifecycle.open
    // Whether a flush / a read is already deferred to the end of the loop iteration.
    // Booleans, not states: each only keeps a second task from being queued, is
    // independent of the other and of the lifecycle, and the task itself checks that.
    private var flushScheduled = false
    private var readScheduled = false
    /// Streams whose writes wait for the outgoing queue to drain.
    private var blockedWriters: [MuxStream] = []

    /// Opener side: whether the peer may open streams too (ids 2^31 and above); when
    /// false such an `open` closes the carrier, as it did before both sides opened.
    public var acceptsPeerStreams = false
    /// A stream was opened by the peer; the payload of its `open` frame.
    public var onOpen: ((MuxStream, UnsafeRawBufferPointer) -> Void)?
    /// Called once when the carrier ends (nil: closed by `close()`).
    public var onClose: ((MuxConnection, Error?) -> Void)?

    public var streamCount: Int { streams.count }
    /// The carrier has ended (and reset every stream on it).
    public var isClosed: Bool {
        if case .closed = lifecycle { true } else { false }
    }
    /// Bytes queued for the carrier and not yet written (here or in the carrier's own
    /// buffer, for TLS).
    public var pendingOutput: Int { outEnd - outStart + carrier.bufferedOutput }

    /// - Parameter pipes: the loop's pipe pool, for splicing payload on a plain carrier.
    public init(loop: EventLoop, carrier: Duplex, isOpener: Bool, pipes: PipePool? = nil) {
        self.loop = loop
        self.carrier = carrier
        self.isOpener = isOpener
        self.pipes = carrier.isSpliceable ? pipes : nil
        inBuf = .allocate(byteCount: Self.inCapacity, alignment: 16)
        out = .allocate(byteCount: outCapacity, alignment: 16)
    }

    deinit {
        inBuf.deallocate()
        out.deallocate()
        if !isClosed { carrier.close(reset: true) }
    }

    /// Starts watching the carrier. On failure the carrier is closed.
    public func start() throws(SystemError) {
        loop.debugAssertInLoop()
        do {
            registration = try loop.register(fd: carrier.fd, interest: .readWrite, handler: self)
        } catch {
            lifecycle = .closed
            carrier.close(reset: true)
            throw error
        }
        carrier.readReady = true
        carrier.writeReady = true
        readFrames()
    }

    /// A new stream whose `open` frame carries `payload`. The acceptor opens streams
    /// only once its peer said it takes them (an older opener closes the carrier on one).
    public func open(_ payload: [UInt8]) -> MuxStream? {
        loop.debugAssertInLoop()
        guard case .open = lifecycle else { return nil }
        var id = nextID
        while streams[id] != nil || !Self.isOwnID(id, opener: isOpener) { id = Self.wrapID(id &+ 1, opener: isOpener) }
        nextID = Self.wrapID(id &+ 1, opener: isOpener)
        let stream = MuxStream(id: id, connection: self, pipes: pipes)
        streams[id] = stream
        payload.withUnsafeBytes { enqueue(.open, id, $0.baseAddress, $0.count) }
        return stream
    }

    /// Ids the opener gives its streams: 1 ..< 2^31; the acceptor's are 2^31 and above.
    private static let acceptorIDs: UInt32 = 1 << 31

    private static func isOwnID(_ id: UInt32, opener: Bool) -> Bool {
        opener ? (id != 0 && id < acceptorIDs) : id >= acceptorIDs
    }

    /// The next id in the side's half, wrapping within it.
    private static func wrapID(_ id: UInt32, opener: Bool) -> UInt32 {
        isOwnID(id, opener: opener) ? id : (opener ? 1 : acceptorIDs)
    }

    /// Ends the carrier and resets every stream on it.
    public func close() {
        loop.debugAssertInLoop()
        fail(nil)
    }

    /// Opens no more streams and ends the carrier once the last running stream has
    /// ended (the session that owned it is gone; its visitors may finish).
    public func closeWhenIdle() {
        loop.debugAssertInLoop()
        onOpen = nil
        switch lifecycle {
        case .open: lifecycle = .draining
        // A failing carrier ends at the next flush anyway.
        case .draining, .failing, .closed: break
        }
        if streams.isEmpty { close() }
    }

    // MARK: events

    public func handleEvents(_ events: UInt32, tag: UInt8) {
        loop.debugAssertInLoop()
        guard !isClosed else { return }
        if !carrier.isSpliceable {
            // TLS may need to write in order to read, and the other way round.
            carrier.readReady = true
            carrier.writeReady = true
        }
        if events & (EventBits.writable | EventBits.hangup | EventBits.error) != 0 { carrier.writeReady = true }
        if events & (EventBits.readable | EventBits.readHangup | EventBits.hangup | EventBits.error) != 0 {
            carrier.readReady = true
        }
        flush()
        readFrames()
    }

    private func readFrames() {
        var budget = Self.readBudget
        while carrier.readReady && !isClosed {
            let want: Int
            switch reader {
            case .payload(let stream, let left):
                budget -= takePayload(for: stream, left)
                if budget <= 0 && carrier.readReady && !isClosed { return deferRead() }
                continue
            case .header:
                if inEnd == Self.inCapacity { compactInput() }
                let buffered = inEnd - inStart
                want = buffered < Self.headerSize ? Self.headerSize - buffered : Self.inCapacity - inEnd
            case .frames:
                if inEnd == Self.inCapacity { compactInput() }
                want = Self.inCapacity - inEnd
            }
            switch carrier.read(into: inBuf + inEnd, count: want) {
            case .bytes(let n):
                inEnd += n
                budget -= n
                parseFrames()
                if budget <= 0 && carrier.readReady && !isClosed { return deferRead() }
            case .wouldBlock:
                carrier.readReady = false
            case .eof:
                fail(SystemError("mux carrier", errno: ECONNRESET))
            case .failed(let e):
                fail(e)
            }
        }
    }

    private func deferRead() {
        guard !readScheduled else { return }
        readScheduled = true
        loop.deferTask { [self] in
            readScheduled = false
            readFrames()
        }
    }

    /// Moves payload of the current frame (`left` bytes of it still on the carrier)
    /// to stream `id`: spliced into the stream's pipe while it takes one, read through
    /// `inBuf` otherwise (a stream with bytes queued in memory, a full pipe, a stream
    /// that is gone). The reader moves on once the payload is all taken. -> bytes moved.
    private func takePayload(for id: UInt32, _ left: Int) -> Int {
        var left = left
        var moved = 0
        if let stream = streams[id], stream.takesPipe {
            splicing: while left > 0 {
                switch stream.spliceIn(from: carrier.fd, left) {
                case .bytes(let n):
                    left -= n
                    moved += n
                case .wouldBlock:
                    // The carrier is empty or the pipe is full: the read below tells.
                    break splicing
                case .eof:
                    fail(SystemError("mux carrier", errno: ECONNRESET))
                    return moved
                case .failed(let e):
                    fail(e)
                    return moved
                }
            }
            // Spliced to the end: the next payload may be spliced too.
            reader = left == 0 ? .header : .payload(stream: id, left: left)
            if moved > 0 { stream.pipeFilled() }
            if left == 0 || isClosed { return moved }
        }
        switch carrier.read(into: inBuf, count: min(left, Self.inCapacity)) {
        case .bytes(let n):
            left -= n
            moved += n
            reader = left == 0 ? .frames : .payload(stream: id, left: left)
            streams[id]?.deliver(UnsafeRawBufferPointer(start: inBuf, count: n))
        case .wouldBlock:
            carrier.readReady = false
        case .eof:
            fail(SystemError("mux carrier", errno: ECONNRESET))
        case .failed(let e):
            fail(e)
        }
        return moved
    }

    private func compactInput() {
        let n = inEnd - inStart
        if inStart > 0 && n > 0 { memmove(inBuf, inBuf + inStart, n) }
        inStart = 0
        inEnd = n
    }

    private func parseFrames() {
        while !isClosed && inEnd - inStart >= Self.headerSize {
            let h = UnsafeRawPointer(inBuf + inStart)
            let rawType = h.load(as: UInt8.self)
            let id = UInt32(bigEndian: h.loadUnaligned(fromByteOffset: 1, as: UInt32.self))
            let length = Int(UInt32(bigEndian: h.loadUnaligned(fromByteOffset: 5, as: UInt32.self)))
            guard let type = FrameType(rawValue: rawType) else {
                return fail(MuxError("unknown mux frame type \(rawType)"))
            }
            let limit = type == .data ? Self.maxPayload : Self.maxControlPayload
            guard length <= limit else {
                return fail(MuxError("mux frame of \(length) bytes exceeds the limit of \(limit)"))
            }
            let buffered = inEnd - inStart - Self.headerSize
            guard buffered >= length else {
                guard type == .data else {
                    reader = .frames
                    // Incomplete: make room for the whole frame if the buffer's tail is short.
                    if inStart + Self.headerSize + length > Self.inCapacity { compactInput() }
                    return
                }
                // Data is passed on as it arrives: what is buffered now, then the rest
                // straight from the carrier (`takePayload`).
                let stream = streams[id]
                if let stream, !stream.admit(length) {
                    return fail(MuxError("mux stream \(id) sent past its window"))
                }
                let start = inBuf + inStart + Self.headerSize
                inStart = 0
                inEnd = 0
                reader = .payload(stream: id, left: length - buffered)
                if buffered > 0 { stream?.deliver(UnsafeRawBufferPointer(start: start, count: buffered)) }
                return
            }
            // Bulk for a stream that takes pipes: read only up to the next header, so the
            // payload of the frame after this one is spliced, not read.
            let bulk = type == .data && length >= Self.spliceMinimum && streams[id]?.takesPipe == true
            reader = bulk ? .header : .frames
            let payload = UnsafeRawBufferPointer(start: h + Self.headerSize, count: length)
            inStart += Self.headerSize + length
            dispatch(type, id, payload)
        }
        if inStart == inEnd {
            inStart = 0
            inEnd = 0
        }
    }

    private func dispatch(_ type: FrameType, _ id: UInt32, _ payload: UnsafeRawBufferPointer) {
        switch type {
        case .open:
            // The acceptor takes any fresh id (an opener of an older version numbers
            // past 2^31 after enough streams); the opener only the acceptor's half, and
            // only when it takes the acceptor's streams at all.
            if isOpener {
                guard acceptsPeerStreams else { return fail(MuxError("mux peer opened a stream on the opening side")) }
                guard id >= Self.acceptorIDs else { return fail(MuxError("mux peer opened stream \(id), an id of the opening side")) }
            }
            guard streams[id] == nil, id != 0 else { return fail(MuxError("mux stream \(id) opened twice")) }
            let stream = MuxStream(id: id, connection: self, pipes: pipes)
            streams[id] = stream
            if let onOpen { onOpen(stream, payload) } else { stream.close(reset: true) }
        case .data:
            guard let stream = streams[id] else { return }
            guard stream.admit(payload.count) else {
                return fail(MuxError("mux stream \(id) sent past its window"))
            }
            stream.deliver(payload)
        case .eof:
            streams[id]?.peerEnded()
        case .reset:
            streams[id]?.peerReset()
        case .window:
            guard payload.count == 4 else { return fail(MuxError("malformed mux window frame")) }
            let credit = Int(UInt32(bigEndian: payload.loadUnaligned(as: UInt32.self)))
            streams[id]?.addCredit(credit)
        }
    }

    // MARK: sending

    /// Whether a stream may queue data now; if not, it is woken once the queue drains.
    func admitWrite(_ stream: MuxStream) -> Bool {
        if pendingOutput < Self.highWater { return true }
        if !blockedWriters.contains(where: { $0 === stream }) { blockedWriters.append(stream) }
        return false
    }

    private static func writeHeader(_ p: UnsafeMutableRawPointer, _ type: FrameType, _ id: UInt32, _ count: Int) {
        p.storeBytes(of: type.rawValue, as: UInt8.self)
        p.storeBytes(of: id.bigEndian, toByteOffset: 1, as: UInt32.self)
        p.storeBytes(of: UInt32(count).bigEndian, toByteOffset: 5, as: UInt32.self)
    }

    /// Runs `body` with a data frame header for `count` bytes of stream `id`, on the stack.
    private func withDataHeader<T>(_ id: UInt32, _ count: Int, _ body: (UnsafeMutableRawPointer) -> T) -> T {
        var header: (UInt64, UInt64) = (0, 0)
        return withUnsafeMutableBytes(of: &header) { h in
            Self.writeHeader(h.baseAddress!, .data, id, count)
            return body(h.baseAddress!)
        }
    }

    /// Stream bytes: on a plain carrier with nothing queued they go out with one sendmsg
    /// straight from the writer's buffer; whatever the socket does not take is queued.
    func sendData(_ id: UInt32, _ payload: UnsafeRawPointer, _ count: Int) {
        guard !isClosed else { return }
        if outStart == outEnd && carrier.isSpliceable && carrier.writeReady && lifecycle.sends {
            let sent: Int = withDataHeader(id, count) { h in
                switch Net.write(carrier.fd, header: h, Self.headerSize, body: payload, count) {
                case .bytes(let n):
                    if n < Self.headerSize {
                        append(h + n, Self.headerSize - n)
                        append(payload, count)
                    } else if n < Self.headerSize + count {
                        append(payload + (n - Self.headerSize), Self.headerSize + count - n)
                    }
                    return n
                case .wouldBlock:
                    carrier.writeReady = false
                    return -1
                case .eof, .failed:
                    failLater(SystemError("sendmsg", errno: EPIPE))
                    return 0
                }
            }
            if sent >= 0 {
                if outEnd > outStart { scheduleFlush() }
                return
            }
        } else if outStart == outEnd && lifecycle.sends {
            // A TLS carrier encrypts the frame straight from the writer's buffer.
            let result = withDataHeader(id, count) { h in
                carrier.writeThrough(header: h, Self.headerSize, body: payload, count)
            }
            if let result {
                if case .failed(let e) = result { failLater(e) }
                return
            }
        }
        enqueue(.data, id, payload, count)
    }

    /// Stream bytes waiting in a pipe (a splicing relay's carrier), for a plain carrier:
    /// with nothing queued, the header goes out with MSG_MORE and the payload is spliced
    /// from the pipe to the carrier, never copied to user space. Whatever the carrier
    /// does not take is read out of the pipe into the queue, so the frame stays whole and
    /// every byte reported as sent has left the pipe.
    func sendData(_ id: UInt32, fromPipe pipe: Int32, _ count: Int) -> IOResult {
        guard lifecycle.sends else { return .failed(SystemError("mux carrier", errno: EPIPE)) }
        if outStart == outEnd && carrier.writeReady {
            let direct: IOResult? = withDataHeader(id, count) { h in
                switch Net.write(carrier.fd, h, Self.headerSize, more: true) {
                case .bytes(let n) where n == Self.headerSize:
                    return splicePayload(from: pipe, count)
                case .bytes(let n):
                    append(h + n, Self.headerSize - n)
                    return queuePayload(from: pipe, count) ? .bytes(count) : carrierFailed()
                case .wouldBlock:
                    carrier.writeReady = false
                    return nil
                case .eof, .failed:
                    return carrierFailed()
                }
            }
            if let direct { return direct }
        }
        reserve(Self.headerSize + count)
        let p = out + outEnd
        guard readPipe(pipe, into: p + Self.headerSize, count) else { return carrierFailed() }
        Self.writeHeader(p, .data, id, count)
        outEnd += Self.headerSize + count
        if outEnd - outStart >= Self.eagerFlush && carrier.writeReady { writeOut() }
        scheduleFlush()
        return .bytes(count)
    }

    /// The header is out: splices the payload, queues what the carrier did not take.
    private func splicePayload(from pipe: Int32, _ count: Int) -> IOResult {
        var moved = 0
        while moved < count {
            switch Net.splice(from: pipe, to: carrier.fd, count - moved) {
            case .bytes(let n):
                moved += n
            case .wouldBlock:
                carrier.writeReady = false
                return queuePayload(from: pipe, count - moved) ? .bytes(count) : carrierFailed()
            case .eof, .failed:
                return carrierFailed()
            }
        }
        return .bytes(count)
    }

    /// The rest of a frame whose start is on the wire or queued: read from the pipe into
    /// the queue, which is written before anything else.
    private func queuePayload(from pipe: Int32, _ count: Int) -> Bool {
        reserve(count)
        guard readPipe(pipe, into: out + outEnd, count) else { return false }
        outEnd += count
        scheduleFlush()
        return true
    }

    /// Reads exactly `count` bytes the caller knows are in the pipe.
    private func readPipe(_ pipe: Int32, into buffer: UnsafeMutableRawPointer, _ count: Int) -> Bool {
        var got = 0
        while got < count {
            guard case .bytes(let n) = Net.read(pipe, buffer + got, count - got), n > 0 else { return false }
            got += n
        }
        return true
    }

    /// A frame could not be completed: the carrier is failed from the loop, not inside
    /// the relay that was writing; the relay fails its own stream now.
    private func carrierFailed() -> IOResult {
        failLater(SystemError("mux carrier", errno: EPIPE))
        return .failed(SystemError("mux carrier", errno: EPIPE))
    }

    /// The first carrier failure stops output; the loop acts on it at the flush. Kept
    /// out of line: a cold path in the middle of the write paths.
    @inline(never)
    private func failLater(_ error: Error) {
        switch lifecycle {
        case .open, .draining: lifecycle = .failing(error)
        case .failing, .closed: break
        }
        scheduleFlush()
    }

    private func append(_ bytes: UnsafeRawPointer, _ count: Int) {
        reserve(count)
        (out + outEnd).copyMemory(from: bytes, byteCount: count)
        outEnd += count
    }

    private func scheduleFlush() {
        guard !flushScheduled else { return }
        flushScheduled = true
        loop.deferTask { [self] in
            flushScheduled = false
            flush()
        }
    }

    func enqueue(_ type: FrameType, _ id: UInt32, _ payload: UnsafeRawPointer?, _ count: Int) {
        guard !isClosed else { return }
        reserve(Self.headerSize + count)
        let p = out + outEnd
        Self.writeHeader(p, type, id, count)
        if let payload, count > 0 { (p + Self.headerSize).copyMemory(from: payload, byteCount: count) }
        outEnd += Self.headerSize + count
        if outEnd - outStart >= Self.eagerFlush && carrier.writeReady && lifecycle.sends {
            // Bulk data goes out as it comes, like a plain relay would send it; small
            // frames wait for the end of the iteration to share one write.
            writeOut()
        }
        scheduleFlush()
    }

    func enqueueWindow(_ id: UInt32, _ credit: Int) {
        var be = UInt32(credit).bigEndian
        withUnsafeBytes(of: &be) { enqueue(.window, id, $0.baseAddress, 4) }
    }

    private func reserve(_ n: Int) {
        if outEnd + n <= outCapacity { return }
        let live = outEnd - outStart
        if outStart > 0 {
            memmove(out, out + outStart, live)
            outStart = 0
            outEnd = live
        }
        if live + n > outCapacity { growBuffer(&out, capacity: &outCapacity, keeping: live, toFit: live + n) }
    }

    /// Writes queued frames while the carrier takes them; never calls back into streams.
    private func writeOut() {
        while outEnd > outStart && carrier.writeReady {
            switch carrier.write(from: out + outStart, count: outEnd - outStart) {
            case .bytes(let n):
                outStart += n
            case .wouldBlock:
                carrier.writeReady = false
            case .eof:
                return failLater(SystemError("mux carrier", errno: EPIPE))
            case .failed(let e):
                return failLater(e)
            }
        }
        if outStart == outEnd {
            outStart = 0
            outEnd = 0
            if carrier.writeReady && carrier.bufferedOutput > 0 {
                switch carrier.flushBuffered() {
                case .wouldBlock: carrier.writeReady = false
                case .failed(let e): failLater(e)
                default: break
                }
            }
        }
    }

    private func flush() {
        if lifecycle.sends { writeOut() }
        switch lifecycle {
        case .open, .draining: break
        case .failing(let e): return fail(e)
        case .closed: return
        }
        if outStart == outEnd {
            if outCapacity > 1 << 20 {
                // A burst grew the queue; an idle carrier keeps only the base size.
                out.deallocate()
                outCapacity = 64 * 1024
                out = .allocate(byteCount: outCapacity, alignment: 16)
            }
        }
        if pendingOutput < Self.lowWater && !blockedWriters.isEmpty {
            let writers = blockedWriters
            blockedWriters.removeAll()
            for w in writers { w.wakeWritable() }
        }
    }

    func remove(_ stream: MuxStream) {
        if streams[stream.id] === stream { streams[stream.id] = nil }
        if let i = blockedWriters.firstIndex(where: { $0 === stream }) { blockedWriters.remove(at: i) }
        if case .draining = lifecycle, streams.isEmpty {
            // Not from inside the relay that is closing the stream; its last frames go first.
            loop.deferTask { [self] in
                if streams.isEmpty && !isClosed {
                    flush()
                    close()
                }
            }
        }
    }

    private func fail(_ error: Error?) {
        guard !isClosed else { return }
        lifecycle = .closed
        if let r = registration {
            loop.deregister(fd: carrier.fd, registration: r)
            registration = nil
        }
        carrier.close(reset: error != nil)
        reader = .frames
        let all = Array(streams.values)
        streams.removeAll()
        blockedWriters.removeAll()
        for s in all { s.peerReset() }
        let callback = onClose
        onClose = nil
        onOpen = nil
        callback?(self, error)
    }
}

public struct MuxError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// One stream of a `MuxConnection`, as a `Duplex` for the buffered copier. It has no
/// descriptor: the connection wakes the relay that attached to it.
///
/// Thread confinement: the connection's loop; public entry points assert it in debug builds.
public final class MuxStream: Duplex {
    /// Where a stream is in its life: which ways bytes may still flow.
    enum State: Equatable {
        /// Both ways.
        case open
        /// One side sent its EOF (`.local`: our `shutdownWrite`); bytes flow the other way.
        case halfClosed(Side)
        /// Both sides sent their EOF; what was received may still be read.
        case finished
        /// Aborted, by the peer's `reset` or by the end of the carrier: reads and writes
        /// fail with ECONNRESET, and closing sends nothing.
        case reset
        /// Closed by its owner: the connection has forgotten it, its buffers are gone.
        case closed

        /// Whether bytes that arrive for the stream are kept for its reader.
        var receives: Bool {
            switch self {
            case .open, .halfClosed, .finished: true
            case .reset, .closed: false
            }
        }
    }

    /// The side of a stream that sent an EOF.
    enum Side {
        case local, remote
    }

    public let id: UInt32
    private let loop: EventLoop
    /// Set until the stream is closed or reset with its carrier: the states that send
    /// (`open`, `halfClosed(.remote)`) always have it.
    private var connection: MuxConnection?
    private(set) var state = State.open
    public var readReady = true
    public var writeReady = true
    private weak var handler: EventHandler?
    private var tag: UInt8 = 0

    /// Bytes received and not yet read, in this order: spliced payload in a pipe
    /// borrowed from the loop's pool, a queue for whatever the reader did not take,
    /// and the frame being delivered (read in place while the relay is woken). New
    /// bytes go into the pipe only while the queue is empty, so the order holds.
    private let pipes: PipePool?
    private var pipe: Pipe?
    private var pipeBytes = 0
    /// The relay splices what this stream lends as a pipe (its other end takes pipes).
    private var lendsPipes = false
    private var current: UnsafeRawBufferPointer?
    private var queue: UnsafeMutableRawPointer?
    private var queueCapacity = 0
    private var queueStart = 0
    private var queueEnd = 0
    /// Bytes the peer may still send (its window as we granted it).
    private(set) var receiveAllowance = MuxConnection.initialWindow
    /// The receive window: credit goes back in quarter-window steps.
    private var window = MuxConnection.initialWindow
    private var consumedSinceCredit = 0
    private var sendWindow = MuxConnection.initialWindow
    /// Bytes read by the relay / written by it.
    public private(set) var bytesIn: UInt64 = 0

    init(id: UInt32, connection: MuxConnection, pipes: PipePool?) {
        self.id = id
        loop = connection.loop
        self.connection = connection
        self.pipes = pipes
    }

    deinit {
        queue?.deallocate()
        releasePipe()
    }

    public var fd: Int32 { -1 }
    public var isSpliceable: Bool { false }

    public func attachVirtual(_ handler: EventHandler, tag: UInt8, peerTakesPipes: Bool) -> Bool {
        loop.debugAssertInLoop()
        self.handler = handler
        self.tag = tag
        lendsPipes = peerTakesPipes && pipes != nil
        return true
    }

    private func wake(_ events: UInt32) {
        handler?.handleEvents(events, tag: tag)
    }

    // MARK: from the connection

    /// A data frame of `count` bytes arrived: false if it is more than the window allows.
    func admit(_ count: Int) -> Bool {
        guard count <= receiveAllowance else { return false }
        receiveAllowance -= count
        return true
    }

    /// Whether the connection may splice this stream's next payload into its pipe.
    var takesPipe: Bool { lendsPipes && state.receives && queueStart == queueEnd }

    /// Splices up to `count` payload bytes from the carrier into this stream's pipe;
    /// `.wouldBlock` when the carrier is empty or the pipe is full.
    func spliceIn(from fd: Int32, _ count: Int) -> IOResult {
        if pipe == nil {
            guard let pipes, let p = try? pipes.take() else { return .wouldBlock }
            pipe = p
        }
        let p = pipe!
        let room = p.capacity - pipeBytes
        guard room > 0 else { return .wouldBlock }
        let r = Net.splice(from: fd, to: p.writeFD, min(count, room))
        if case .bytes(let n) = r { pipeBytes += n }
        return r
    }

    /// Spliced payload is waiting: wakes the relay.
    func pipeFilled() {
        if pipeBytes > 0 { wake(EventBits.readable) }
    }

    /// Gives the pipe back (to the pool if empty, closed if it still holds bytes).
    private func releasePipe() {
        guard let p = pipe else { return }
        pipe = nil
        if pipeBytes == 0 { pipes?.give(p) } else { pipes?.discard(p) }
        pipeBytes = 0
    }

    func deliver(_ payload: UnsafeRawBufferPointer) {
        guard state.receives else { return }
        if queueStart == queueEnd && pipeBytes == 0 && handler != nil {
            current = payload
            wake(EventBits.readable)
            if let rest = current, rest.count > 0 { append(rest) }
            current = nil
        } else {
            append(payload)
            wake(EventBits.readable)
        }
    }

    private func append(_ bytes: UnsafeRawBufferPointer) {
        let live = queueEnd - queueStart
        if queueEnd + bytes.count > queueCapacity {
            if live + bytes.count <= queueCapacity, let q = queue {
                memmove(q, q + queueStart, live)
            } else {
                var capacity = max(queueCapacity, 64 * 1024)
                while live + bytes.count > capacity { capacity *= 2 }
                let bigger = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
                if let q = queue {
                    bigger.copyMemory(from: q + queueStart, byteCount: live)
                    q.deallocate()
                }
                queue = bigger
                queueCapacity = capacity
            }
            queueStart = 0
            queueEnd = live
        }
        (queue! + queueEnd).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        queueEnd += bytes.count
    }

    func peerEnded() {
        switch state {
        case .open: state = .halfClosed(.remote)
        case .halfClosed(.local): state = .finished
        case .halfClosed(.remote), .finished, .reset, .closed: break
        }
        wake(EventBits.readable)
    }

    /// The peer reset the stream, or the carrier ended (then the connection is closed).
    func peerReset() {
        switch state {
        case .open, .halfClosed, .finished, .reset: state = .reset
        case .closed: return
        }
        // A live connection keeps a reset stream until its owner closes it; a closed
        // one has forgotten all its streams.
        if connection?.isClosed != false { connection = nil }
        wake(EventBits.error)
    }

    func addCredit(_ credit: Int) {
        sendWindow += credit
        wake(EventBits.writable)
    }

    func wakeWritable() { wake(EventBits.writable) }

    // MARK: Duplex

    public func read(into buffer: UnsafeMutableRawPointer, count: Int) -> IOResult {
        loop.debugAssertInLoop()
        switch borrowReadable()! {
        case .pipe(let fd, let available):
            switch Net.read(fd, buffer, min(count, available)) {
            case .bytes(let n):
                consumeBorrowed(n)
                return .bytes(n)
            case .wouldBlock, .eof:
                return .failed(SystemError("read", errno: EIO))
            case .failed(let e):
                return .failed(e)
            }
        case .bytes(let region):
            let n = min(count, region.count)
            buffer.copyMemory(from: region.baseAddress!, byteCount: n)
            consumeBorrowed(n)
            return .bytes(n)
        case .wouldBlock: return .wouldBlock
        case .eof: return .eof
        case .failed(let e): return .failed(e)
        }
    }

    public func borrowReadable() -> Borrowed? {
        loop.debugAssertInLoop()
        let drained: Borrowed
        switch state {
        case .open, .halfClosed(.local): drained = .wouldBlock
        case .halfClosed(.remote), .finished: drained = .eof
        case .reset: return .failed(SystemError("mux stream", errno: ECONNRESET))
        case .closed: return .failed(SystemError("mux stream", errno: EBADF))
        }
        if pipeBytes > 0, let p = pipe { return .pipe(fd: p.readFD, count: pipeBytes) }
        if queueStart < queueEnd, let q = queue {
            return .bytes(UnsafeRawBufferPointer(start: q + queueStart, count: queueEnd - queueStart))
        }
        if let c = current, c.count > 0 { return .bytes(c) }
        return drained
    }

    public func consumeBorrowed(_ n: Int) {
        loop.debugAssertInLoop()
        guard n > 0 else { return }
        if pipeBytes > 0 {
            pipeBytes -= n
            // Drained: an idle stream keeps no pipe.
            if pipeBytes == 0 { releasePipe() }
        } else if queueStart < queueEnd, let q = queue {
            queueStart += n
            if queueStart == queueEnd {
                // Drained: an idle stream keeps no buffer.
                q.deallocate()
                queue = nil
                queueCapacity = 0
                queueStart = 0
                queueEnd = 0
            }
        } else if let c = current {
            current = UnsafeRawBufferPointer(rebasing: c[n...])
        }
        bytesIn &+= UInt64(n)
        consumedSinceCredit += n
        if consumedSinceCredit >= window / 4 && peerMaySend {
            var credit = consumedSinceCredit
            if queueStart == queueEnd && pipeBytes == 0 && window < MuxConnection.maxWindow {
                // Nothing waits behind what was read: the reader keeps up, so the
                // window may grow.
                credit += window
                window *= 2
            }
            receiveAllowance += credit
            connection?.enqueueWindow(id, credit)
            consumedSinceCredit = 0
        }
    }

    /// Whether the peer has not ended its side yet (so credit is worth sending).
    private var peerMaySend: Bool {
        switch state {
        case .open, .halfClosed(.local): true
        case .halfClosed(.remote), .finished, .reset, .closed: false
        }
    }

    public func pendingError() -> Int32 {
        loop.debugAssertInLoop()
        switch state {
        case .reset: return ECONNRESET
        case .open, .halfClosed, .finished, .closed: return 0
        }
    }

    /// On a splicing carrier (one with a pipe pool: plain), bytes are spliced on from
    /// the writer's pipe.
    public var acceptsPipe: Bool { pipes != nil && connection != nil }

    /// The connection this stream's bytes go out on; throws why it may not send now.
    private func sender() throws(SystemError) -> MuxConnection {
        switch state {
        case .open, .halfClosed(.remote):
            if let connection { return connection }
        case .halfClosed(.local), .finished, .closed:
            break
        case .reset:
            throw SystemError("mux stream", errno: ECONNRESET)
        }
        throw SystemError("mux stream", errno: EPIPE)
    }

    public func write(fromPipe fd: Int32, count: Int) -> IOResult {
        loop.debugAssertInLoop()
        let connection: MuxConnection
        do { connection = try sender() } catch { return .failed(error) }
        let n = min(count, sendWindow, MuxConnection.maxPayload)
        if n == 0 || !connection.admitWrite(self) { return .wouldBlock }
        let r = connection.sendData(id, fromPipe: fd, n)
        if case .bytes(let sent) = r { sendWindow -= sent }
        return r
    }

    public func write(from buffer: UnsafeRawPointer, count: Int) -> IOResult {
        loop.debugAssertInLoop()
        let connection: MuxConnection
        do { connection = try sender() } catch { return .failed(error) }
        let n = min(count, sendWindow, MuxConnection.maxPayload)
        if n == 0 || !connection.admitWrite(self) { return .wouldBlock }
        connection.sendData(id, buffer, n)
        sendWindow -= n
        return .bytes(n)
    }

    public func shutdownWrite() -> SystemError? {
        loop.debugAssertInLoop()
        switch state {
        case .open: state = .halfClosed(.local)
        case .halfClosed(.remote): state = .finished
        case .halfClosed(.local), .finished, .closed: return nil
        case .reset: return SystemError("mux stream", errno: ECONNRESET)
        }
        connection?.enqueue(.eof, id, nil, 0)
        return nil
    }

    public func close(reset: Bool) {
        loop.debugAssertInLoop()
        // As with a socket: closing sends the end of stream (the relay closes instead of
        // shutting down the last direction); a reset, or closing while the peer still
        // sends, aborts the stream at the other end.
        let last: MuxConnection.FrameType?
        switch state {
        case .open, .halfClosed(.local): last = .reset
        case .halfClosed(.remote): last = reset ? .reset : .eof
        case .finished: last = reset ? .reset : nil
        case .reset: last = nil
        case .closed: return
        }
        state = .closed
        handler = nil
        current = nil
        releasePipe()
        queue?.deallocate()
        queue = nil
        queueCapacity = 0
        queueStart = 0
        queueEnd = 0
        if let connection {
            if let last { connection.enqueue(last, id, nil, 0) }
            connection.remove(self)
        }
        connection = nil
    }
}
