#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// Takes the PROXY protocol header off an accepted socket before its relay starts, under
/// a deadline so a sender that dawdles cannot hold the connection open.
///
/// It looks with `MSG_PEEK` and consumes only the header's own bytes, so the client's
/// first bytes stay in the socket: the relay that follows gets a plain socket, and
/// splices as it would without the header. Bytes peeked without finding the header's
/// end all belong to the header (see `ProxyHeader.Parse`) and are consumed, so each
/// edge brings new bytes and nothing is peeked twice for long.
///
/// Thread confinement: created, started and cancelled on `loop`. `onDone` is called
/// exactly once, on the loop, after the socket was deregistered; the caller owns the
/// descriptor again then (and closes it on failure).
public final class ProxyHeaderReader: EventHandler {
    private enum State {
        case idle
        /// Waiting for more of the header; `seen` is what was consumed so far.
        case reading(registration: Registration, timer: LoopTimer, seen: [UInt8])
        case finished
    }

    public let loop: EventLoop
    private let fd: Int32
    private let timeout: Duration
    private let onDone: (Result<ProxyHeader, ProxyHeaderError>) -> Void
    private var state = State.idle

    public init(loop: EventLoop, fd: Int32, timeout: Duration, onDone: @escaping (Result<ProxyHeader, ProxyHeaderError>) -> Void) {
        self.loop = loop
        self.fd = fd
        self.timeout = timeout
        self.onDone = onDone
    }

    public func start() {
        loop.assertInLoop()
        guard case .idle = state else { return }
        let registration: Registration
        do {
            registration = try loop.register(fd: fd, interest: .read, handler: self)
        } catch {
            return finish(.failure(.failed(error)))
        }
        let timer = loop.schedule(after: timeout) { [weak self] in self?.end(.failure(.timedOut)) }
        state = .reading(registration: registration, timer: timer, seen: [])
        // The header may be here already (edge-triggered: no event for bytes that
        // arrived before the registration).
        readAvailable()
    }

    /// Gives up (drain deadline, owner gone); reports `cancelled` unless done.
    public func cancel() {
        loop.assertInLoop()
        end(.failure(.cancelled))
    }

    public func handleEvents(_ events: UInt32, tag: UInt8) {
        readAvailable()
    }

    private func readAvailable() {
        while case .reading(let registration, let timer, var seen) = state {
            var parse: ProxyHeader.Parse
            do {
                parse = try ProxyHeader.parse(seen)
            } catch {
                return end(.failure(error))
            }
            guard case .incomplete(let readUpTo) = parse else { return }
            var window = [UInt8](repeating: 0, count: readUpTo - seen.count)
            let peeked = recv(fd, &window, window.count, Int32(MSG_PEEK))
            if peeked == 0 { return end(.failure(.truncated)) }
            if peeked < 0 {
                switch errno {
                case EINTR: continue
                case EAGAIN: return
                default: return end(.failure(.failed(SystemError("recv", errno: errno))))
                }
            }
            let candidate = seen + window[0..<peeked]
            do {
                parse = try ProxyHeader.parse(candidate)
            } catch {
                return end(.failure(error))
            }
            let take: Int
            switch parse {
            case .complete(_, let length): take = length - seen.count
            case .incomplete: take = peeked
            }
            // Consumes what the peek showed to be header; nothing else can have taken it.
            let consumed = recv(fd, &window, take, 0)
            guard consumed == take else { return end(.failure(.failed(SystemError("recv", errno: consumed < 0 ? errno : EIO)))) }
            seen += window[0..<take]
            if case .complete(let header, _) = parse {
                timer.cancel()
                loop.deregister(fd: fd, registration: registration)
                return finish(.success(header))
            }
            state = .reading(registration: registration, timer: timer, seen: seen)
        }
    }

    private func end(_ result: Result<ProxyHeader, ProxyHeaderError>) {
        guard case .reading(let registration, let timer, _) = state else { return }
        timer.cancel()
        loop.deregister(fd: fd, registration: registration)
        finish(result)
    }

    private func finish(_ result: Result<ProxyHeader, ProxyHeaderError>) {
        state = .finished
        onDone(result)
    }
}
