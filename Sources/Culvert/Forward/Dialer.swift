import Reactor
import Transfer

/// Connects one accepted client to the first target that answers, trying the attempts
/// in order, each bounded by the connect timeout.
///
/// Thread confinement: lives on its worker's loop.
final class Dialer: EventHandler {
    enum Outcome {
        /// `registration` is the fd's live registration (nil when connect finished at
        /// once); the caller takes it over.
        case connected(fd: Int32, registration: Registration?, attempt: TargetSet.Attempt)
        case exhausted(tried: Int)
        /// Given up from outside before a target answered (drain deadline).
        case cancelled
    }

    private let loop: EventLoop
    private let attempts: [TargetSet.Attempt]
    private let connectTimeout: Duration
    private let onTargetFailure: (TargetSet.Attempt, SystemError) -> Void
    private let onDone: (Dialer, Outcome) -> Void
    private var next = 0
    private var current: (fd: Int32, registration: Registration, timer: LoopTimer, attempt: TargetSet.Attempt)?
    private var finished = false

    init(loop: EventLoop, attempts: [TargetSet.Attempt], connectTimeout: Duration,
         onTargetFailure: @escaping (TargetSet.Attempt, SystemError) -> Void,
         onDone: @escaping (Dialer, Outcome) -> Void) {
        self.loop = loop
        self.attempts = attempts
        self.connectTimeout = connectTimeout
        self.onTargetFailure = onTargetFailure
        self.onDone = onDone
    }

    func start() { tryNext() }

    /// Gives up at once (drain deadline); reports `cancelled`.
    func cancel() {
        guard !finished else { return }
        releaseCurrent(closeSocket: true)
        finish(.cancelled)
    }

    private func tryNext() {
        while next < attempts.count {
            let attempt = attempts[next]
            next += 1
            do throws(SystemError) {
                let (fd, connected) = try Net.startConnect(attempt.address)
                if connected { return finish(.connected(fd: fd, registration: nil, attempt: attempt)) }
                let registration: Registration
                do {
                    // Both directions from the start, so the relay can take the
                    // registration over without another epoll_ctl.
                    registration = try loop.register(fd: fd, interest: .readWrite, handler: self)
                } catch {
                    Posix.close(fd)
                    throw error
                }
                let timer = loop.schedule(after: connectTimeout) { [unowned self] in
                    self.currentFailed(SystemError("connect", errno: ETIMEDOUT))
                }
                current = (fd, registration, timer, attempt)
                return
            } catch {
                onTargetFailure(attempt, error)
            }
        }
        finish(.exhausted(tried: attempts.count))
    }

    func handleEvents(_ events: UInt32, tag: UInt8) {
        guard let c = current else { return }
        // Writable without error or hang-up means connected; only failures need SO_ERROR.
        let failed = events & (EventBits.error | EventBits.hangup) != 0
        let err = failed ? Net.pendingError(c.fd) : (events & EventBits.writable != 0 ? 0 : EINPROGRESS)
        if err == 0 {
            current = nil
            c.timer.cancel()
            finish(.connected(fd: c.fd, registration: c.registration, attempt: c.attempt))
        } else if err != EINPROGRESS && err != EALREADY {
            currentFailed(SystemError("connect", errno: err))
        }
    }

    private func currentFailed(_ error: SystemError) {
        guard let c = current else { return }
        releaseCurrent(closeSocket: true)
        onTargetFailure(c.attempt, error)
        tryNext()
    }

    private func releaseCurrent(closeSocket: Bool) {
        guard let c = current else { return }
        current = nil
        c.timer.cancel()
        if closeSocket {
            loop.forget(registration: c.registration)
            Posix.close(c.fd)
        } else {
            loop.deregister(fd: c.fd, registration: c.registration)
        }
    }

    private func finish(_ outcome: Outcome) {
        guard !finished else { return }
        finished = true
        onDone(self, outcome)
    }
}

#if canImport(Glibc)
import Glibc
#endif
