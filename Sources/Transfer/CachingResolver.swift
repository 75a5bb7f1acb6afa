import Reactor
import Synchronization

/// Name lookups for work that asks per connection (a proxy's destinations): getaddrinfo
/// runs on a small fixed `WorkerPool` with a capped queue, every lookup has a deadline,
/// and answers are kept for a short time in a bounded cache shared by every loop, so a
/// burst of connections to one name costs one lookup and no loop ever blocks.
///
/// Thread safety: `resolve` may be called from tasks on any loop; the cache is locked.
public final class CachingResolver: Sendable {
    /// Why a lookup gave no address.
    public enum Failure: Error, Equatable, CustomStringConvertible, Sendable {
        /// Every pool thread is busy and the queue is full.
        case busy
        case timedOut
        /// The name has no address (or getaddrinfo failed): its reason.
        case notFound(String)

        public var description: String {
            switch self {
            case .busy: return "resolver queue full"
            case .timedOut: return "lookup timed out"
            case .notFound(let reason): return reason
            }
        }
    }

    private struct Entry {
        let addresses: [SocketAddress]
        let expires: UInt64
    }

    private let pool: WorkerPool
    private let timeout: Duration
    private let ttl: UInt64
    private let maxEntries: Int
    private let cache = Mutex<[String: Entry]>([:])

    public init(threads: Int = 4, queueLimit: Int = 256, timeout: Duration = .seconds(5),
                ttl: Duration = .seconds(30), maxEntries: Int = 4096) {
        pool = WorkerPool(threads: threads, queueLimit: queueLimit)
        self.timeout = timeout
        self.ttl = ttl.nanoseconds
        self.maxEntries = maxEntries
    }

    /// The addresses of `host` with `port`, in getaddrinfo's order (the system's
    /// preference between IPv6 and IPv4); a numeric host is answered at once.
    public func resolve(host: String, port: UInt16, on loop: EventLoop) async -> Result<[SocketAddress], Failure> {
        if let numeric = SocketAddress(numericHost: host, port: port) { return .success([numeric]) }
        let key = host.lowercased()
        let now = MonotonicClock.now()
        if let hit = cache.withLock({ $0[key] }), hit.expires > now {
            return .success(hit.addresses.map { $0.withPort(port) })
        }
        let answer: Result<[SocketAddress], Failure> = await withCheckedContinuation { continuation in
            let once = Once(continuation)
            let timer = loop.schedule(after: timeout) { once.finish(.failure(.timedOut)) }
            let queued = pool.submit(on: loop, { Resolver.resolveBlocking(host: host, port: 0, passive: false) }) { [self] result in
                timer.cancel()
                switch result {
                case .success(let addresses):
                    remember(key, addresses)
                    once.finish(.success(addresses))
                case .failure(let failure):
                    once.finish(.failure(.notFound(failure.reason)))
                }
            }
            if !queued {
                timer.cancel()
                once.finish(.failure(.busy))
            }
        }
        return answer.map { $0.map { $0.withPort(port) } }
    }

    private func remember(_ key: String, _ addresses: [SocketAddress]) {
        let now = MonotonicClock.now()
        cache.withLock { cache in
            if cache.count >= maxEntries {
                cache = cache.filter { $0.value.expires > now }
                // All still fresh: one arbitrary entry makes room; a bounded cache
                // matters more than which name is looked up again.
                if cache.count >= maxEntries, let any = cache.keys.first { cache[any] = nil }
            }
            cache[key] = Entry(addresses: addresses, expires: now &+ ttl)
        }
    }
}

/// Resumes a lookup's continuation once: the answer or the deadline, whichever comes
/// first. Both run on the lookup's loop, so no lock is needed.
private final class Once: @unchecked Sendable {
    private var continuation: CheckedContinuation<Result<[SocketAddress], CachingResolver.Failure>, Never>?

    init(_ continuation: CheckedContinuation<Result<[SocketAddress], CachingResolver.Failure>, Never>) {
        self.continuation = continuation
    }

    func finish(_ result: Result<[SocketAddress], CachingResolver.Failure>) {
        guard let c = continuation else { return }
        continuation = nil
        c.resume(returning: result)
    }
}
