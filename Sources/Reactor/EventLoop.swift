#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import CCulvert

/// What a registered file descriptor's owner implements: called on the loop thread with
/// the epoll event bits and the tag given at registration (so one handler can own
/// several fds). Edge-triggered: the handler must read/write until EAGAIN or remember
/// that it stopped early.
public protocol EventHandler: AnyObject {
    func handleEvents(_ events: UInt32, tag: UInt8)
}

/// Readiness a registration asks for.
public struct Interest: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let read = Interest(rawValue: EPOLLIN.rawValue | EPOLLRDHUP.rawValue)
    public static let write = Interest(rawValue: EPOLLOUT.rawValue)
    public static let readWrite: Interest = [.read, .write]
}

/// Event bits handed to `EventHandler.handleEvents`.
public enum EventBits {
    public static let readable = EPOLLIN.rawValue
    public static let writable = EPOLLOUT.rawValue
    public static let readHangup = EPOLLRDHUP.rawValue
    public static let hangup = EPOLLHUP.rawValue
    public static let error = EPOLLERR.rawValue
}

/// A handle on one fd's registration; stale handles (after deregistration) are ignored.
public struct Registration: Equatable, Sendable {
    let slot: UInt32
    let generation: UInt32
    var token: UInt64 { UInt64(generation) << 32 | UInt64(slot) }
}

/// One edge-triggered epoll loop, run by exactly one thread.
///
/// Thread confinement: registrations, timers and `deferred` work are touched only on the
/// loop's own thread, checked by `assertInLoop()` (a `precondition`, in every build) at
/// each of those entry points; the data path of loop-bound streams checks with
/// `debugAssertInLoop()` (debug builds only). The only entry points safe from other
/// threads are `execute(_:)`, `stop()` and the executor `enqueue`, which go through a
/// lock-protected queue and an eventfd wake-up.
public final class EventLoop: @unchecked Sendable {
    public let id: Int
    private let epollFD: Int32
    private let wakeFD: Int32
    private var handlers: [EventHandler?] = []
    private var generations: [UInt32] = []
    private var tags: [UInt8] = []
    private var freeSlots: [UInt32] = []
    private let timers = TimerHeap()
    private var deadlineQueues: [DeadlineQueue] = []
    private var deferred: [() -> Void] = []
    private let inbox = Mutex<[() -> Void]>([])
    private let stopRequested = Atomic<Bool>(false)
    /// The thread running `run()`, nil while the loop is not running.
    /// The thread running the loop, 0 while none does. Atomic because other threads ask
    /// (`inEventLoop` decides between a direct call and the inbox).
    @usableFromInline let owner = Atomic<UInt>(0)
    private let maxEvents: Int32 = 256
    private let events: UnsafeMutablePointer<epoll_event>
    /// Runs async tasks on this loop: `Task(executorPreference: loop.tasks)`.
    public let tasks = LoopTaskExecutor()
    /// The loop's notion of now, refreshed once per iteration (cheap for hot paths).
    public private(set) var now: UInt64 = MonotonicClock.now()

    private static let wakeToken: UInt64 = .max

    public init(id: Int = 0) throws(SystemError) {
        self.id = id
        epollFD = try Posix.check("epoll_create1", epoll_create1(Int32(EPOLL_CLOEXEC)))
        let efd = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        if efd < 0 {
            let e = errno
            Posix.close(epollFD)
            throw SystemError("eventfd", errno: e)
        }
        wakeFD = efd
        events = .allocate(capacity: Int(maxEvents))
        var ev = epoll_event()
        ev.events = EPOLLIN.rawValue | EPOLLET.rawValue
        ev.data.u64 = EventLoop.wakeToken
        _ = try Posix.check("epoll_ctl", epoll_ctl(epollFD, EPOLL_CTL_ADD, wakeFD, &ev))
        tasks.loop = self
    }

    deinit {
        Posix.close(wakeFD)
        Posix.close(epollFD)
        events.deallocate()
    }

    /// True on the thread that runs this loop.
    public var inEventLoop: Bool {
        owner.load(ordering: .acquiring) == UInt(pthread_self())
    }

    /// On the loop's thread, or no thread runs the loop (set-up, tear-down).
    @inlinable
    var inLoopOrIdle: Bool {
        let t = owner.load(ordering: .acquiring)
        return t == 0 || t == UInt(pthread_self())
    }

    /// Stops the process unless called on the thread that runs this loop, or while no
    /// thread runs it (set-up before `run()`, tear-down after). Loop-confined types call it
    /// at their entry points (start, register, schedule, close), never per read or write.
    ///
    /// A `precondition`, so release builds check too: it costs a `pthread_self()` and a
    /// compare (about 1 ns), next to the epoll_ctl or timer-heap work each caller does
    /// anyway, and a call from the wrong thread then stops with this loop's id instead of
    /// corrupting its handler table or timer heap.
    @inline(__always)
    public func assertInLoop(file: StaticString = #fileID, line: UInt = #line) {
        precondition(inLoopOrIdle, "called off event loop \(id)", file: file, line: line)
    }

    /// `assertInLoop()` for the data path, in debug builds only: the multiplexed stream
    /// types call it on every read and write, where a release-build check (a
    /// `pthread_self` per call) would cost; inlinable, so that release builds compile it
    /// away in other modules too.
    @inlinable
    public func debugAssertInLoop(file: StaticString = #fileID, line: UInt = #line) {
        assert(inLoopOrIdle, "not on event loop \(id)", file: file, line: line)
    }

    /// Live registrations, for tests and leak checks.
    public var registrationCount: Int { handlers.count - freeSlots.count }
    /// Pending timers, for tests and leak checks.
    public var timerCount: Int {
        deadlineQueues.reduce(timers.count) { $0 + $1.waiting - ($1.isArmed ? 1 : 0) }
    }

    // MARK: registrations

    /// Adds `fd` to the epoll set (edge-triggered); the loop keeps `handler` alive until
    /// `deregister`.
    public func register(fd: Int32, interest: Interest, handler: EventHandler, tag: UInt8 = 0) throws(SystemError) -> Registration {
        assertInLoop()
        let slot: UInt32
        if let free = freeSlots.popLast() {
            slot = free
            handlers[Int(slot)] = handler
            tags[Int(slot)] = tag
        } else {
            slot = UInt32(handlers.count)
            handlers.append(handler)
            generations.append(0)
            tags.append(tag)
        }
        let reg = Registration(slot: slot, generation: generations[Int(slot)])
        var ev = epoll_event()
        ev.events = interest.rawValue | EPOLLET.rawValue
        ev.data.u64 = reg.token
        if epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &ev) < 0 {
            let e = errno
            release(reg)
            throw SystemError("epoll_ctl(ADD)", errno: e)
        }
        return reg
    }

    /// Changes what `fd` waits for.
    public func modify(fd: Int32, registration: Registration, interest: Interest) throws(SystemError) {
        assertInLoop()
        var ev = epoll_event()
        ev.events = interest.rawValue | EPOLLET.rawValue
        ev.data.u64 = registration.token
        _ = try Posix.check("epoll_ctl(MOD)", epoll_ctl(epollFD, EPOLL_CTL_MOD, fd, &ev))
    }

    /// Removes `fd` from the epoll set and drops the handler. Call before closing `fd`.
    /// Events already fetched for it in this iteration are discarded.
    public func deregister(fd: Int32, registration: Registration) {
        assertInLoop()
        var ev = epoll_event()
        _ = epoll_ctl(epollFD, EPOLL_CTL_DEL, fd, &ev)
        release(registration)
    }

    /// Drops the handler without epoll_ctl(DEL), for an fd about to be closed: closing
    /// removes it from the epoll set anyway, and the slot's new generation stops stale
    /// events. Only for descriptors that are never duplicated.
    public func forget(registration: Registration) {
        assertInLoop()
        release(registration)
    }

    /// Hands a registered fd to another handler without any epoll_ctl, e.g. from the
    /// code that connected it to the relay that will use it; the interest stays as
    /// registered.
    public func transfer(registration: Registration, to handler: EventHandler, tag: UInt8) -> Registration {
        assertInLoop()
        let i = Int(registration.slot)
        precondition(i < handlers.count && generations[i] == registration.generation, "stale registration")
        handlers[i] = handler
        tags[i] = tag
        return registration
    }

    private func release(_ reg: Registration) {
        let i = Int(reg.slot)
        guard i < handlers.count, generations[i] == reg.generation else { return }
        handlers[i] = nil
        generations[i] &+= 1
        freeSlots.append(reg.slot)
    }

    // MARK: timers and tasks

    /// Runs `action` on this loop after `delay`. Loop thread only.
    @discardableResult
    public func schedule(after delay: Duration, _ action: @escaping () -> Void) -> LoopTimer {
        assertInLoop()
        let timer = LoopTimer(deadline: MonotonicClock.now() &+ delay.nanoseconds, action: action)
        timers.insert(timer)
        return timer
    }

    /// Runs `action` on this loop after `delay`, like `schedule(after:)`, for a delay that
    /// many timers share (a service's connect timeout): they wait in a `DeadlineQueue`,
    /// so starting and cancelling one touches no heap and allocates nothing. Cancel with
    /// `cancel(_:)`. Loop thread only.
    public func scheduleQueued(after delay: Duration, _ action: @escaping () -> Void) -> QueuedTimer {
        assertInLoop()
        let queue = deadlineQueues.first { $0.delay == delay } ?? addDeadlineQueue(delay)
        return queue.add(now: now, action)
    }

    /// Stops a timer of `scheduleQueued`; a no-op once it fired or was cancelled.
    public func cancel(_ timer: QueuedTimer) {
        assertInLoop()
        deadlineQueues[timer.queue].cancel(timer)
    }

    private func addDeadlineQueue(_ delay: Duration) -> DeadlineQueue {
        let queue = DeadlineQueue(delay: delay, index: deadlineQueues.count, heap: timers)
        deadlineQueues.append(queue)
        return queue
    }

    /// Moves a pending timer to `delay` from now (or schedules it again if it fired).
    public func reschedule(_ timer: LoopTimer, after delay: Duration) {
        assertInLoop()
        timers.remove(timer)
        timer.deadline = now &+ delay.nanoseconds
        if timer.action != nil { timers.insert(timer) }
    }

    /// Runs `task` on this loop after the current batch of events. Loop thread only.
    public func deferTask(_ task: @escaping () -> Void) {
        assertInLoop()
        deferred.append(task)
    }

    /// Runs `task` on this loop; safe from any thread.
    public func execute(_ task: @escaping @Sendable () -> Void) {
        let wasEmpty = inbox.withLock { queue in
            queue.append(task)
            return queue.count == 1
        }
        if wasEmpty { wake() }
    }

    private func wake() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    /// Asks the loop to return from `run()`; safe from any thread.
    public func stop() {
        stopRequested.store(true, ordering: .releasing)
        wake()
    }

    // MARK: running

    /// Runs the loop on the calling thread until `stop()`.
    ///
    /// One clock reading per iteration, right after `epoll_wait`, serves the whole
    /// iteration: the due timers and the next wait's timeout are measured from it. A
    /// timer then fires no earlier than its deadline and at most one iteration's work
    /// later, which is within the millisecond the timeout is rounded up to anyway.
    public func run() {
        owner.store(UInt(pthread_self()), ordering: .releasing)
        defer { owner.store(0, ordering: .releasing) }
        now = MonotonicClock.now()
        while !stopRequested.load(ordering: .acquiring) {
            let timeout = nextTimeoutMillis()
            let n = epoll_wait(epollFD, events, maxEvents, timeout)
            now = MonotonicClock.now()
            if n < 0 {
                if errno == EINTR { continue }
                fatalError("epoll_wait: \(SystemError("epoll_wait", errno: errno))")
            }
            // `execute` wakes the loop whenever it fills an empty inbox, so an iteration
            // without a wake-up has nothing there: no lock to take.
            var woken = false
            for i in 0..<Int(n) {
                let ev = events[i]
                let token = ev.data.u64
                if token == EventLoop.wakeToken {
                    var value: UInt64 = 0
                    _ = read(wakeFD, &value, 8)
                    woken = true
                    continue
                }
                let slot = Int(token & 0xffff_ffff)
                guard slot < handlers.count, generations[slot] == UInt32(token >> 32),
                      let handler = handlers[slot] else { continue }
                handler.handleEvents(ev.events, tag: tags[slot])
            }
            runDueTimers()
            if woken { runInbox() }
            runDeferred()
        }
    }

    private func nextTimeoutMillis() -> Int32 {
        if !deferred.isEmpty { return 0 }
        guard let first = timers.earliest else { return -1 }
        if first.deadline <= now { return 0 }
        let ms = (first.deadline - now + 999_999) / 1_000_000
        return Int32(min(ms, UInt64(Int32.max)))
    }

    private func runDueTimers() {
        while let timer = timers.popDue(now: now) {
            timer.action?()
            // Release what the closure holds unless it rescheduled its own timer.
            if !timer.isPending { timer.action = nil }
        }
    }

    private func runInbox() {
        // Swapping in the empty array allocates nothing; removeAll(keepingCapacity:) on
        // the shared storage allocated a copy on every loop iteration, tasks or not.
        let tasks = inbox.withLock { queue -> [() -> Void] in
            let taken = queue
            queue = []
            return taken
        }
        for task in tasks { task() }
    }

    private func runDeferred() {
        if deferred.isEmpty { return }
        // Tasks deferred while running these run in the next iteration, after new events.
        let batch = deferred
        deferred = []
        for task in batch { task() }
    }
}

// MARK: Swift concurrency

/// The loop is a serial executor, so actors and `async` control-plane code can be pinned
/// to it and touch loop-confined state without hopping threads.
extension EventLoop: SerialExecutor {
    public func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        execute { [unowned self] in unowned.runSynchronously(on: self.asUnownedSerialExecutor()) }
    }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: self)
    }

    public func checkIsolated() {
        precondition(inEventLoop, "not on event loop \(id)")
    }
}

/// The loop as a task executor: `Task(executorPreference: loop.tasks) { ... }` runs the
/// task's nonisolated async code on the loop thread (start-up, handshakes, drain).
///
/// Kept apart from the serial-executor conformance because a job must be run the way
/// it was enqueued: a task-executor job run as if isolated to a serial executor makes
/// the runtime hop back to the task executor, forever.
public final class LoopTaskExecutor: TaskExecutor, @unchecked Sendable {
    unowned var loop: EventLoop!

    public func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        loop.execute { [unowned self] in unowned.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}

extension EventLoop {
    /// Suspends the calling task (running on this loop) for `delay`.
    public func sleep(for delay: Duration) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            schedule(after: delay) { c.resume() }
        }
    }
}
