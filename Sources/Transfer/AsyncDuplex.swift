import Reactor

/// Why an `AsyncDuplex` operation ended early.
public enum ChannelError: Error, Equatable, CustomStringConvertible, Sendable {
    case closed
    case eof
    case io(SystemError)
    case timedOut(String)
    case protocolViolation(String)
    /// More than the channel's send limit was waiting for the peer to read.
    case peerNotReading(queued: Int, limit: Int)

    public var description: String {
        switch self {
        case .closed: return "connection closed"
        case .eof: return "connection closed by peer"
        case .io(let e): return "\(e)"
        case .timedOut(let what): return "\(what) timed out"
        case .protocolViolation(let why): return why
        case .peerNotReading(let queued, let limit):
            return "peer is not reading: \(queued) bytes queued, over the send queue cap of \(limit)"
        }
    }
}

/// A `Duplex` driven by async code on its loop: the control-plane view of a connection
/// (handshakes, framed messages), before it is handed to a relay with `detach()`.
///
/// Reads suspend until the loop reports readiness; `send` queues bytes and flushes them
/// as the socket allows, so heartbeats and requests from timers never block. The queue
/// is capped (`sendLimit`): a peer that keeps sending requests but never reads the
/// answers fails the channel instead of growing memory without end.
///
/// Thread confinement: used only from tasks running on `loop` (its executor) and from
/// the loop's callbacks.
public final class AsyncDuplex: EventHandler {
    /// A control channel carries frames of at most a few KiB, a handful in flight; a
    /// megabyte the socket has not taken means the peer has stopped reading.
    public static let defaultSendLimit = 1 << 20

    public let loop: EventLoop
    /// The most bytes `send` may leave queued (beyond what the socket took).
    public let sendLimit: Int
    public private(set) var duplex: Duplex
    /// How the loop tells this channel about readiness.
    private enum Watch {
        case registered(Registration)
        /// A stream without a descriptor (a multiplexed stream) wakes this channel itself.
        case virtual
        case released
    }
    private var watch: Watch
    private var readWaiter: CheckedContinuation<Void, Error>?
    private var writeWaiter: CheckedContinuation<Void, Error>?
    private var outgoing: [UInt8] = []
    private var outgoingOffset = 0
    private var failure: ChannelError?

    public init(loop: EventLoop, duplex: Duplex, sendLimit: Int = AsyncDuplex.defaultSendLimit) throws(SystemError) {
        self.loop = loop
        self.duplex = duplex
        self.sendLimit = sendLimit
        watch = .released
        if duplex.attachVirtual(self, tag: 0) {
            watch = .virtual
        } else {
            watch = .registered(try loop.register(fd: duplex.fd, interest: .readWrite, handler: self))
        }
    }

    public var isOpen: Bool {
        guard failure == nil else { return false }
        if case .released = watch { return false }
        return true
    }

    /// Bytes given to `send` that the socket has not taken yet.
    public var hasPendingOutput: Bool { outgoingOffset < outgoing.count }
    /// Bytes sent and not yet written: a datagram carrier drops rather than pass `sendLimit`.
    public var queuedOutput: Int { outgoing.count - outgoingOffset }

    public func handleEvents(_ events: UInt32, tag: UInt8) {
        // Any readiness may unblock either side of a layered stream; retrying is cheap.
        duplex.readReady = true
        duplex.writeReady = true
        flushOutgoing()
        resume(&readWaiter)
        if outgoing.isEmpty { resume(&writeWaiter) }
    }

    private func resume(_ waiter: inout CheckedContinuation<Void, Error>?) {
        guard let w = waiter else { return }
        waiter = nil
        if let failure { w.resume(throwing: failure) } else { w.resume() }
    }

    /// Suspends until the loop reports the connection ready in either direction (or the
    /// channel fails). For a layered stream that runs its own handshake step by step:
    /// the caller retries the step after each wake-up, as `read` retries a read.
    public func waitForReadiness() async throws {
        if let failure { throw failure }
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, Error>) in
            readWaiter = c
        }
    }

    // MARK: reading

    /// Reads at least one byte, at most `max`.
    public func read(max: Int) async throws -> [UInt8] {
        while true {
            if let failure { throw failure }
            var out = [UInt8](repeating: 0, count: max)
            let r = out.withUnsafeMutableBytes { duplex.read(into: $0.baseAddress!, count: max) }
            switch r {
            case .bytes(let n):
                out.removeSubrange(n...)
                return out
            case .eof: throw ChannelError.eof
            case .failed(let e): throw ChannelError.io(e)
            case .wouldBlock: try await waitForReadiness()
            }
        }
    }

    /// Reads exactly `count` bytes, never more: what follows stays in the socket (or the
    /// TLS layer) for whoever reads next.
    public func readExactly(_ count: Int) async throws -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count)
        while out.count < count {
            out += try await read(max: count - out.count)
        }
        return out
    }

    // MARK: writing

    /// Queues `bytes` and writes what the socket takes now; the rest goes out as it drains.
    /// When more than `sendLimit` bytes are left waiting, the channel fails with
    /// `ChannelError.peerNotReading` (readers and `flush` see it).
    public func send(_ bytes: [UInt8]) {
        guard failure == nil else { return }
        outgoing += bytes
        flushOutgoing()
        let queued = outgoing.count - outgoingOffset
        if queued > sendLimit { fail(.peerNotReading(queued: queued, limit: sendLimit)) }
    }

    /// Waits until everything sent has been written to the socket.
    public func flush() async throws {
        while !outgoing.isEmpty {
            if let failure { throw failure }
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, Error>) in
                writeWaiter = c
            }
        }
        if let failure { throw failure }
    }

    private func flushOutgoing() {
        while outgoingOffset < outgoing.count && failure == nil {
            let r = outgoing.withUnsafeBytes {
                duplex.write(from: $0.baseAddress! + outgoingOffset, count: outgoing.count - outgoingOffset)
            }
            switch r {
            case .bytes(let n): outgoingOffset += n
            case .wouldBlock: return
            case .eof: fail(.eof)
            case .failed(let e): fail(.io(e))
            }
        }
        if outgoingOffset == outgoing.count {
            outgoing.removeAll(keepingCapacity: false)
            outgoingOffset = 0
        } else if outgoingOffset * 2 >= outgoing.count {
            // A peer that reads slowly but never lets the queue empty would otherwise
            // keep every byte ever sent; dropping the written half keeps the copy amortised.
            outgoing.removeSubrange(..<outgoingOffset)
            outgoingOffset = 0
        }
    }

    // MARK: ending

    /// Fails pending and future operations with `error` (a timeout, a protocol error)
    /// and closes the connection.
    public func fail(_ error: ChannelError, reset: Bool = true) {
        guard failure == nil else { return }
        failure = error
        outgoing = []
        outgoingOffset = 0
        resume(&readWaiter)
        resume(&writeWaiter)
        release()
        duplex.close(reset: reset)
    }

    public func close() { fail(.closed, reset: false) }

    /// Puts `layer` (a stream over the current one, on the same socket) in its place once
    /// a handshake on the bare stream is done: a WebSocket after its HTTP upgrade, TLS
    /// inside that WebSocket. Nothing may be queued for sending.
    public func layer(_ layer: Duplex) {
        precondition(outgoing.isEmpty && layer.fd == duplex.fd, "a layer goes over the same socket, nothing unsent")
        duplex = layer
    }

    /// Stops watching the connection and hands it over (to a relay); nothing may be
    /// queued for sending.
    public func detach() -> Duplex {
        precondition(outgoing.isEmpty, "detach with unsent bytes")
        release()
        failure = .closed
        return duplex
    }

    private func release() {
        // A virtual stream keeps a weak reference to its handler; whoever attaches next
        // (a relay) replaces it.
        if case .registered(let r) = watch { loop.deregister(fd: duplex.fd, registration: r) }
        watch = .released
    }
}
