#if canImport(Glibc)
import Glibc
#endif

/// A fixed set of threads for blocking work that comes per request (name lookups of a
/// proxy), where `Offload`'s thread per call would let a flood make threads without end.
/// Work waits in a queue of at most `queueLimit` items; beyond that `submit` refuses it
/// at once, so a burst meets a count, not memory.
///
/// Thread safety: `submit` may be called from any thread; each item's completion runs
/// on the loop it names.
public final class WorkerPool: @unchecked Sendable {
    private let queueLimit: Int
    private let lock: UnsafeMutablePointer<pthread_mutex_t>
    private let wake: UnsafeMutablePointer<pthread_cond_t>
    private var queue: [() -> Void] = []
    private var head = 0

    /// Starts `threads` threads that live as long as the process.
    public init(threads: Int, queueLimit: Int) {
        precondition(threads >= 1 && queueLimit >= 1)
        self.queueLimit = queueLimit
        lock = .allocate(capacity: 1)
        pthread_mutex_init(lock, nil)
        wake = .allocate(capacity: 1)
        pthread_cond_init(wake, nil)
        for _ in 0..<threads {
            pthread_detach(LoopGroup.spawn { [self] in serve() })
        }
    }

    /// Items queued and not yet taken by a thread.
    public var queued: Int {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        return queue.count - head
    }

    /// Runs `work` on a pool thread and `done` with its result on `loop`; false (and
    /// neither runs) when the queue is full.
    public func submit<T>(on loop: EventLoop, _ work: @escaping () -> T, done: @escaping (T) -> Void) -> Bool {
        let item = {
            let box = WorkerResult(work())
            loop.execute { done(box.value) }
        }
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        guard queue.count - head < queueLimit else { return false }
        queue.append(item)
        pthread_cond_signal(wake)
        return true
    }

    private func serve() {
        while true {
            pthread_mutex_lock(lock)
            while head == queue.count { pthread_cond_wait(wake, lock) }
            let item = queue[head]
            head += 1
            if head == queue.count {
                queue.removeAll(keepingCapacity: true)
                head = 0
            } else if head >= 64 && head * 2 >= queue.count {
                // A queue that never empties would otherwise keep every item ever run.
                queue.removeSubrange(..<head)
                head = 0
            }
            pthread_mutex_unlock(lock)
            item()
        }
    }
}

private final class WorkerResult<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
