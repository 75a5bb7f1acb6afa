#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// Connects to the first of several addresses that answers, trying them in order, each
/// attempt bounded by the connect timeout. The one place culvert makes an outgoing TCP
/// connection, with two faces over the same state machine:
///
/// - `start()` with callbacks, for code driven by the loop (a forwarder's client, a
///   multiplexed visitor): no task per connection, and the connected socket's
///   registration is handed over so the relay needs no second `epoll_ctl`.
/// - `connect(to:timeout:on:)`, for async control-plane code (handshakes, `pipe`).
///
/// Thread confinement: created, started and cancelled on `loop`.
public final class Connector: EventHandler {
    public enum Outcome {
        /// `registration` is the socket's live read/write registration (nil when connect
        /// finished at once); the caller takes it over. `index` is the address that answered.
        case connected(fd: Int32, registration: Registration?, index: Int)
        /// Every address failed; `lastError` is the last failure (nil: no address given).
        case exhausted(tried: Int, lastError: SystemError?)
        /// Given up from outside (drain deadline, owner gone) before an address answered.
        case cancelled
    }

    private enum State {
        case idle
        /// Waiting for the socket of `addresses[index]` to become writable.
        case connecting(fd: Int32, registration: Registration, timer: QueuedTimer, index: Int)
        case finished
    }

    public let loop: EventLoop
    private let addresses: [SocketAddress]
    private let timeout: Duration
    private let onAttemptFailed: (Int, SystemError) -> Void
    private let onDone: (Connector, Outcome) -> Void
    private var next = 0
    private var lastError: SystemError?
    private var state = State.idle
    /// Set when `connected` came with a registration whose connect event showed nothing
    /// to read and no hang-up: whatever the peer sends next brings an event of its own,
    /// so the new owner need not read before the loop says so.
    public private(set) var connectedQuietly = false

    /// - Parameters:
    ///   - onAttemptFailed: called for each address that failed (its index), before the next is tried.
    ///   - onDone: called exactly once, on the loop, unless the connector is dropped before `start`.
    public init(loop: EventLoop, addresses: [SocketAddress], timeout: Duration,
                onAttemptFailed: @escaping (Int, SystemError) -> Void = { _, _ in },
                onDone: @escaping (Connector, Outcome) -> Void) {
        self.loop = loop
        self.addresses = addresses
        self.timeout = timeout
        self.onAttemptFailed = onAttemptFailed
        self.onDone = onDone
    }

    public func start() {
        loop.assertInLoop()
        tryNext()
    }

    /// Gives up at once; reports `cancelled` unless the outcome is already known.
    public func cancel() {
        loop.assertInLoop()
        if case .finished = state { return }
        releaseAttempt()
        finish(.cancelled)
    }

    private func tryNext() {
        while next < addresses.count {
            let index = next
            next += 1
            do throws(SystemError) {
                let (fd, connected) = try Net.startConnect(addresses[index])
                if connected { return finish(.connected(fd: fd, registration: nil, index: index)) }
                let registration: Registration
                do {
                    // Both directions from the start, so a relay can take the
                    // registration over without another epoll_ctl.
                    registration = try loop.register(fd: fd, interest: .readWrite, handler: self)
                } catch {
                    Posix.close(fd)
                    throw error
                }
                // Strong: the one capture is then the closure's context (no allocation),
                // and every path out of `.connecting` cancels the timer, dropping it.
                // Queued: every attempt of a loop waits the same timeout.
                let timer = loop.scheduleQueued(after: timeout) { [self] in
                    attemptFailed(SystemError("connect", errno: ETIMEDOUT))
                }
                state = .connecting(fd: fd, registration: registration, timer: timer, index: index)
                return
            } catch {
                lastError = error
                onAttemptFailed(index, error)
            }
        }
        finish(.exhausted(tried: addresses.count, lastError: lastError))
    }

    public func handleEvents(_ events: UInt32, tag: UInt8) {
        guard case .connecting(let fd, let registration, let timer, let index) = state else { return }
        // Writable without error or hang-up means connected; only failures need SO_ERROR.
        let failed = events & (EventBits.error | EventBits.hangup) != 0
        let err = failed ? Net.pendingError(fd) : (events & EventBits.writable != 0 ? 0 : EINPROGRESS)
        if err == 0 {
            loop.cancel(timer)
            state = .idle
            connectedQuietly = events & (EventBits.readable | EventBits.readHangup) == 0
            finish(.connected(fd: fd, registration: registration, index: index))
        } else if err != EINPROGRESS && err != EALREADY {
            attemptFailed(SystemError("connect", errno: err))
        }
    }

    private func attemptFailed(_ error: SystemError) {
        guard case .connecting(_, _, _, let index) = state else { return }
        releaseAttempt()
        lastError = error
        onAttemptFailed(index, error)
        tryNext()
    }

    /// Closes the socket of the attempt in flight, if any.
    private func releaseAttempt() {
        guard case .connecting(let fd, let registration, let timer, _) = state else { return }
        state = .idle
        loop.cancel(timer)
        loop.forget(registration: registration)
        Posix.close(fd)
    }

    private func finish(_ outcome: Outcome) {
        state = .finished
        onDone(self, outcome)
    }

    // MARK: the async face

    /// Connects to the first address that answers and returns the connected,
    /// non-blocking socket, not registered with the loop; the caller owns it. Throws the
    /// last attempt's error (ECONNREFUSED when `addresses` is empty).
    public static func connect(to addresses: [SocketAddress], timeout: Duration, on loop: EventLoop) async throws(SystemError) -> Int32 {
        let outcome: Outcome = await withCheckedContinuation { continuation in
            let connector = Connector(loop: loop, addresses: addresses, timeout: timeout) { _, outcome in
                continuation.resume(returning: outcome)
            }
            connector.start()
        }
        switch outcome {
        case .connected(let fd, let registration, _):
            if let registration { loop.deregister(fd: fd, registration: registration) }
            return fd
        case .exhausted(_, let lastError):
            throw lastError ?? SystemError("connect", errno: ECONNREFUSED)
        case .cancelled:
            throw SystemError("connect", errno: ECANCELED)
        }
    }
}
