#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// Why a relayed connection ended; the label is what the close log line says.
public enum CloseReason: Equatable, CustomStringConvertible, Sendable {
    /// Both directions reached EOF and were passed on.
    case eof
    /// A side reset or failed; the other side was reset too.
    case reset(SystemError)
    case idleTimeout
    case drainTimeout

    public var label: String {
        switch self {
        case .eof: return "eof"
        case .reset: return "reset"
        case .idleTimeout: return "idle-timeout"
        case .drainTimeout: return "drain-timeout"
        }
    }

    public var description: String {
        if case .reset(let e) = self { return "reset (\(e))" }
        return label
    }
}

/// Relays bytes both ways between two connected streams until both directions end.
///
/// Half-close passes through (EOF one way shuts down the write side of the other end
/// while the opposite direction keeps going); a reset or error on either side aborts
/// both, once the bytes already received are passed on as far as the ends take them
/// without waiting; each direction reads only while its carrier has room, so a slow
/// reader slows the writer (backpressure). Plain sockets on both ends splice through a
/// pooled pipe; any layered stream uses the buffered copier behind the same
/// `CopyDirection`.
///
/// Thread confinement: created, driven and closed on one event loop.
public final class CopyBidirectional: EventHandler {
    private static let tagA: UInt8 = 0
    private static let tagB: UInt8 = 1
    /// Bytes one direction may move per wake-up before yielding to other connections.
    private static let budget = 4 << 20

    public let loop: EventLoop
    private let resources: LoopResources
    private let a: Duplex
    private let b: Duplex
    private let preferSplice: Bool
    private var aToB: CopyDirection
    private var bToA: CopyDirection
    /// (fd, registration) pairs: one per socket, two for a side with separate read and
    /// write descriptors (stdin/stdout).
    private var registrations: [(Int32, Registration)] = []
    private let endsWithBToA: Bool
    private var idleTimer: LoopTimer?
    private let idleTimeout: Duration?
    private var lastActivity: UInt64
    private var pumpScheduled = false
    /// Per side: a short read empties the socket (see `CopyDirection.pump`). True for a
    /// plain socket this relay registered itself (epoll reports what was already
    /// pending) and after an event without a hang-up; false after one with a hang-up,
    /// and for an adopted registration, whose earlier events someone else consumed.
    private var shortReadDrainsA = false
    private var shortReadDrainsB = false
    public private(set) var isClosed = false
    public let startedAt: UInt64
    private let onClose: (CopyBidirectional, CloseReason) -> Void

    /// Bytes delivered from `a` to `b` and from `b` to `a`.
    public var bytesAToB: UInt64 { aToB.bytes }
    public var bytesBToA: UInt64 { bToA.bytes }
    public var usesSplice: Bool { aToB.useSplice }

    /// - Parameters:
    ///   - preferSplice: splice when both ends allow it; false forces the buffered copier.
    ///   - endsWithBToA: end the relay as soon as `b` has sent EOF and it reached `a`
    ///     (`culvert pipe`: the remote closing ends the command), not when both are done.
    ///   - onClose: called once, on the loop, after both descriptors are closed.
    public init(loop: EventLoop, resources: LoopResources, a: Duplex, b: Duplex, preferSplice: Bool = true,
                idleTimeout: Duration? = nil, endsWithBToA: Bool = false,
                onClose: @escaping (CopyBidirectional, CloseReason) -> Void) {
        self.loop = loop
        self.resources = resources
        self.a = a
        self.b = b
        self.preferSplice = preferSplice
        // A direction splices when its source is a socket and its destination takes
        // bytes from a pipe (another socket, or a multiplexed stream on a plain carrier).
        aToB = CopyDirection(useSplice: preferSplice && a.isSpliceable && b.acceptsPipe)
        bToA = CopyDirection(useSplice: preferSplice && b.isSpliceable && a.acceptsPipe)
        self.idleTimeout = idleTimeout
        self.endsWithBToA = endsWithBToA
        self.onClose = onClose
        startedAt = loop.now
        lastActivity = loop.now
    }

    /// Registers both ends and starts moving bytes. On failure both ends are closed.
    /// - Parameters:
    ///   - registrationOfB: `b`'s fd is already registered for reading and writing (by
    ///     the code that connected it); the relay takes that registration over.
    ///   - adoptedQuiet: the events consumed on that registration showed nothing to read
    ///     and no hang-up (`Connector.connectedQuietly`): `b` is read once the loop
    ///     reports it, not before.
    public func start(adopting registrationOfB: Registration? = nil, adoptedQuiet: Bool = false) throws(SystemError) {
        loop.assertInLoop()
        do {
            try register(a, tag: Self.tagA, other: b)
            shortReadDrainsA = a.isSpliceable
            if let registrationOfB {
                registrations.append((b.fd, loop.transfer(registration: registrationOfB, to: self, tag: Self.tagB)))
                if adoptedQuiet && b.isSpliceable {
                    b.readReady = false
                    shortReadDrainsB = true
                }
            } else {
                try register(b, tag: Self.tagB, other: a)
                shortReadDrainsB = b.isSpliceable
            }
        } catch {
            if let r = registrationOfB, !registrations.contains(where: { $0.1 == r }) {
                loop.forget(registration: r)
            }
            teardown(reset: true)
            throw error
        }
        if let idleTimeout {
            idleTimer = loop.schedule(after: idleTimeout) { [unowned self] in self.checkIdle() }
        }
        pump()
    }

    private func register(_ side: Duplex, tag: UInt8, other: Duplex) throws(SystemError) {
        if side.attachVirtual(self, tag: tag, peerTakesPipes: preferSplice && other.acceptsPipe) { return }
        let separate = side.writeFD != side.fd
        try watch(side.fd, separate ? .read : .readWrite, tag: tag)
        if separate { try watch(side.writeFD, .write, tag: tag) }
    }

    private func watch(_ fd: Int32, _ interest: Interest, tag: UInt8) throws(SystemError) {
        do {
            registrations.append((fd, try loop.register(fd: fd, interest: interest, handler: self, tag: tag)))
        } catch where error.errno == EPERM {
            // A regular file cannot be polled; it is always ready, and the copier reads
            // or writes it until EOF without waiting.
        }
    }

    public func handleEvents(_ events: UInt32, tag: UInt8) {
        guard !isClosed else { return }
        let side = tag == Self.tagA ? a : b
        if !side.isSpliceable {
            // A layered stream (TLS) may need to write in order to read or the other way
            // round, so any readiness is a reason to try both.
            side.readReady = true
            side.writeReady = true
        }
        if events & EventBits.error != 0 {
            // A reset while this side's direction waits for room (or the other side
            // waits for it to read) would otherwise go unseen until the other end moves.
            let e = side.pendingError()
            if e != 0 { return fail(SystemError("socket", errno: e)) }
        }
        if events & (EventBits.readable | EventBits.readHangup | EventBits.hangup | EventBits.error) != 0 {
            side.readReady = true
        }
        // The event shows the socket's state when it was fetched: without a hang-up in
        // it, a FIN that comes later brings an event of its own.
        let drains = side.isSpliceable && events & (EventBits.readHangup | EventBits.hangup | EventBits.error) == 0
        if tag == Self.tagA { shortReadDrainsA = drains } else { shortReadDrainsB = drains }
        if events & (EventBits.writable | EventBits.hangup | EventBits.error) != 0 {
            side.writeReady = true
        }
        pump()
    }

    /// Ends the relay now, resetting both ends (idle timeout, drain deadline).
    public func abort(_ reason: CloseReason) {
        loop.assertInLoop()
        guard !isClosed else { return }
        finish(reason, reset: true)
    }

    private func pump() {
        guard !isClosed else { return }
        let before = aToB.bytes &+ bToA.bytes
        let first = aToB.pump(from: a, to: b, resources: resources, budget: Self.budget, closingAfter: bToA.isDone,
                              shortReadDrains: shortReadDrainsA)
        if case .failed(let e) = first { return fail(e) }
        let second = bToA.pump(from: b, to: a, resources: resources, budget: Self.budget,
                               closingAfter: aToB.isDone || endsWithBToA, shortReadDrains: shortReadDrainsB)
        if case .failed(let e) = second { return fail(e) }
        if aToB.bytes &+ bToA.bytes != before { lastActivity = loop.now }
        if bToA.isDone && (aToB.isDone || endsWithBToA) { return finish(.eof, reset: false) }
        if (first == .yielded || second == .yielded) && !pumpScheduled {
            pumpScheduled = true
            loop.deferTask { [self] in
                pumpScheduled = false
                pump()
            }
        }
    }

    private func checkIdle() {
        guard !isClosed, let idleTimeout, let timer = idleTimer else { return }
        let idleFor = loop.now &- lastActivity
        if idleFor >= idleTimeout.nanoseconds {
            finish(.idleTimeout, reset: true)
        } else {
            loop.reschedule(timer, after: .nanoseconds(Int64(idleTimeout.nanoseconds - idleFor)))
        }
    }

    /// Ends the relay after a reset or error on one side, resetting both.
    ///
    /// A peer's last bytes often arrive together with its RST, and Linux still hands
    /// them to recv (or splice) before it reports the error, as a direct connection would
    /// deliver them. So before the reset each direction moves once more what it can
    /// without waiting (one budget at most; a failing side just fails again), and the
    /// reset follows them. Both ends count as done when they end, so an EOF read here
    /// (the error was already taken by SO_ERROR or a failed write) sends no FIN that
    /// would hide the reset. Bytes the kernel still queues toward an end when it is reset
    /// are dropped, as they are for a peer that aborts its own connection.
    private func fail(_ error: SystemError) {
        for side in [a, b] {
            // Readiness may be stale: this batch's events for the other side are not
            // handled yet, and trying once more costs one EAGAIN.
            side.readReady = true
            side.writeReady = true
        }
        _ = aToB.pump(from: a, to: b, resources: resources, budget: Self.budget, closingAfter: true)
        _ = bToA.pump(from: b, to: a, resources: resources, budget: Self.budget, closingAfter: true)
        finish(.reset(error), reset: true)
    }

    private func finish(_ reason: CloseReason, reset: Bool) {
        teardown(reset: reset)
        onClose(self, reason)
    }

    private func teardown(reset: Bool) {
        guard !isClosed else { return }
        isClosed = true
        idleTimer?.cancel()
        idleTimer = nil
        // Descriptors closed right below leave epoll by themselves: no epoll_ctl needed.
        let closing = a.closesDescriptors && b.closesDescriptors
        for (fd, r) in registrations {
            if closing { loop.forget(registration: r) } else { loop.deregister(fd: fd, registration: r) }
        }
        registrations.removeAll()
        aToB.abandon(resources)
        bToA.abandon(resources)
        a.close(reset: reset)
        b.close(reset: reset)
    }
}
