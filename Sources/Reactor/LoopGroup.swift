#if canImport(Glibc)
import Glibc
#endif
import CCulvert

/// A fixed set of event loops, one per thread. Loop 0 runs on the thread that calls
/// `run()` (the main thread, which also owns signal handling); the others get their own
/// threads when the group starts.
public final class LoopGroup: @unchecked Sendable {
    public let loops: [EventLoop]
    private var threads: [pthread_t] = []

    public init(threads count: Int) throws(SystemError) {
        precondition(count >= 1)
        var made: [EventLoop] = []
        for i in 0..<count { made.append(try EventLoop(id: i)) }
        loops = made
    }

    public var main: EventLoop { loops[0] }

    /// Number of online CPUs, the default loop count.
    public static var coreCount: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// Starts loops 1..<n on their own threads, then runs loop 0 on the calling thread
    /// until it stops; then stops and joins the others.
    public func run() {
        for loop in loops.dropFirst() {
            threads.append(LoopGroup.spawn { loop.run() })
        }
        main.run()
        for loop in loops.dropFirst() { loop.stop() }
        for t in threads { pthread_join(t, nil) }
        threads.removeAll()
    }

    /// Stops every loop; safe from any thread.
    public func stop() {
        for loop in loops { loop.stop() }
    }

    /// Starts a thread that blocks the process's handled signals, so only the main
    /// loop's signalfd sees them, then runs `body`.
    static func spawn(_ body: @escaping () -> Void) -> pthread_t {
        final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { arg in
            let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            SignalSource.handledSignals.withUnsafeBufferPointer {
                _ = culvert_block_signals($0.baseAddress, Int32($0.count))
            }
            box.body()
            return nil
        }, box)
        precondition(rc == 0, "pthread_create failed: \(rc)")
        return thread
    }
}

/// Runs blocking work (name resolution) on a short-lived thread and hands the result
/// back on an event loop, so no loop thread ever blocks. Meant for rare calls.
public enum Offload {
    public static func run<T>(on loop: EventLoop, _ work: @escaping () -> T) async -> T {
        await withCheckedContinuation { (cont: CheckedContinuation<T, Never>) in
            let thread = LoopGroup.spawn {
                let box = OffloadResult(work())
                loop.execute { cont.resume(returning: box.value) }
            }
            pthread_detach(thread)
        }
    }
}

private final class OffloadResult<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
