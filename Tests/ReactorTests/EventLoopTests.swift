import Foundation
import Glibc
import Synchronization
import XCTest
@testable import Reactor

/// Runs `loop` on its own thread for the duration of a test.
final class LoopRunner {
    let loop: EventLoop
    private let thread: Thread
    private let finished = DispatchSemaphore(value: 0)

    init() throws {
        let loop = try EventLoop()
        self.loop = loop
        let done = finished
        thread = Thread { loop.run(); done.signal() }
        thread.start()
    }

    /// Runs `body` on the loop and waits for it.
    func sync<T>(_ body: @escaping () -> T) -> T {
        let sem = DispatchSemaphore(value: 0)
        let box = UnsafeBox<T>()
        loop.execute { box.value = body(); sem.signal() }
        sem.wait()
        return box.value!
    }

    func stop() {
        loop.stop()
        finished.wait()
    }
}

final class UnsafeBox<T>: @unchecked Sendable { var value: T? }

final class EventLoopTests: XCTestCase {
    func testTimersFireInDeadlineOrderAndTiesInScheduleOrder() throws {
        let runner = try LoopRunner()
        defer { runner.stop() }
        let fired = Mutex<[String]>([])
        let done = expectation(description: "all timers fired")
        runner.sync {
            let loop = runner.loop
            loop.schedule(after: .milliseconds(60)) { fired.withLock { $0.append("c") }; done.fulfill() }
            loop.schedule(after: .milliseconds(20)) { fired.withLock { $0.append("a") } }
            loop.schedule(after: .milliseconds(40)) { fired.withLock { $0.append("b1") } }
            let cancelled = loop.schedule(after: .milliseconds(30)) { fired.withLock { $0.append("never") } }
            loop.schedule(after: .milliseconds(40)) { fired.withLock { $0.append("b2") } }
            cancelled.cancel()
        }
        wait(for: [done], timeout: 5)
        XCTAssertEqual(fired.withLock { $0 }, ["a", "b1", "b2", "c"])
        XCTAssertEqual(runner.sync { runner.loop.timerCount }, 0)
    }

    func testTimerDoesNotFireEarly() throws {
        let runner = try LoopRunner()
        defer { runner.stop() }
        let done = expectation(description: "fired")
        let start = MonotonicClock.now()
        let elapsed = Mutex<UInt64>(0)
        runner.sync {
            runner.loop.schedule(after: .milliseconds(50)) {
                elapsed.withLock { $0 = MonotonicClock.now() - start }
                done.fulfill()
            }
        }
        wait(for: [done], timeout: 5)
        XCTAssertGreaterThanOrEqual(elapsed.withLock { $0 }, 50_000_000)
    }

    func testRescheduleMovesTimer() throws {
        let runner = try LoopRunner()
        defer { runner.stop() }
        let order = Mutex<[String]>([])
        let done = expectation(description: "both fired")
        done.expectedFulfillmentCount = 2
        runner.sync {
            let loop = runner.loop
            let moved = loop.schedule(after: .milliseconds(10)) { order.withLock { $0.append("moved") }; done.fulfill() }
            loop.schedule(after: .milliseconds(30)) { order.withLock { $0.append("fixed") }; done.fulfill() }
            loop.reschedule(moved, after: .milliseconds(60))
        }
        wait(for: [done], timeout: 5)
        XCTAssertEqual(order.withLock { $0 }, ["fixed", "moved"])
    }

    func testCrossThreadTasksAllRunOnTheLoopThread() throws {
        let runner = try LoopRunner()
        defer { runner.stop() }
        let count = Mutex<Int>(0)
        let offLoop = Mutex<Int>(0)
        let done = expectation(description: "all tasks ran")
        let perThread = 2_000
        let threads = 4
        done.expectedFulfillmentCount = threads * perThread
        let loop = runner.loop
        DispatchQueue.concurrentPerform(iterations: threads) { _ in
            for _ in 0..<perThread {
                loop.execute {
                    if !loop.inEventLoop { offLoop.withLock { $0 += 1 } }
                    count.withLock { $0 += 1 }
                    done.fulfill()
                }
            }
        }
        wait(for: [done], timeout: 10)
        XCTAssertEqual(count.withLock { $0 }, threads * perThread)
        XCTAssertEqual(offLoop.withLock { $0 }, 0)
        XCTAssertFalse(loop.inEventLoop)
    }

    /// The loop takes its inbox only in an iteration that saw the wake-up, so every task
    /// must bring one: a task sent to a loop that sleeps, and a chain of tasks each
    /// executed from the one before on the loop thread, all run without a stall.
    func testEveryTaskWakesTheLoopWhetherSentFromOutsideOrFromTheLoop() throws {
        let runner = try LoopRunner()
        defer { runner.stop() }
        let loop = runner.loop
        let ran = DispatchSemaphore(value: 0)
        for _ in 0..<3_000 {
            loop.execute { ran.signal() }
            XCTAssertEqual(ran.wait(timeout: .now() + 5), .success, "a task sent to a sleeping loop did not run")
        }
        let chainDone = expectation(description: "chain of loop-executed tasks finished")
        let left = Mutex<Int>(3_000)
        @Sendable func step() {
            let more = left.withLock { n -> Bool in
                n -= 1
                return n > 0
            }
            if more { loop.execute(step) } else { chainDone.fulfill() }
        }
        loop.execute(step)
        wait(for: [chainDone], timeout: 10)
    }

    func testAsyncCodeRunsOnTheLoopAsItsExecutor() throws {
        let runner = try LoopRunner()
        defer { runner.stop() }
        let loop = runner.loop
        let result = Mutex<[Bool]>([])
        let done = expectation(description: "task finished")
        Task(executorPreference: loop.tasks) {
            result.withLock { $0.append(loop.inEventLoop) }
            // A value computed off-loop comes back to the loop.
            let v = await Offload.run(on: loop) { () -> Int in
                XCTAssertFalse(loop.inEventLoop)
                return 42
            }
            result.withLock { $0.append(loop.inEventLoop && v == 42) }
            done.fulfill()
        }
        wait(for: [done], timeout: 5)
        XCTAssertEqual(result.withLock { $0 }, [true, true])
    }

    /// The confinement check lets through set-up before the loop runs and every call on the
    /// loop thread. (A call from another thread stops the process, which a test cannot
    /// observe; what it can check is that such a thread is not taken for the loop's.)
    func testConfinementCheckPassesBeforeRunAndOnTheLoopThread() throws {
        let loop = try EventLoop()
        loop.assertInLoop()
        let early = loop.schedule(after: .seconds(60)) {}
        early.cancel()

        let runner = try LoopRunner()
        defer { runner.stop() }
        let onLoop = runner.sync { () -> Bool in
            runner.loop.assertInLoop()
            let timer = runner.loop.schedule(after: .seconds(60)) {}
            timer.cancel()
            return runner.loop.inEventLoop
        }
        XCTAssertTrue(onLoop)
        XCTAssertFalse(runner.loop.inEventLoop)
    }
}

/// Reads until EAGAIN on every edge, as edge-triggered handlers must.
final class DrainingReader: EventHandler {
    let fd: Int32
    var total = 0
    var sawEOF = false
    var sawHangupBit = false
    var wakeups = 0
    let onEOF: () -> Void

    init(fd: Int32, onEOF: @escaping () -> Void) {
        self.fd = fd
        self.onEOF = onEOF
    }

    func handleEvents(_ events: UInt32, tag: UInt8) {
        wakeups += 1
        if events & EventBits.readHangup != 0 { sawHangupBit = true }
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buf, buf.count)
            if n > 0 { total += n; continue }
            if n == 0 { if !sawEOF { sawEOF = true; onEOF() }; return }
            if errno == EAGAIN { return }
            XCTFail("read failed: \(errno)")
            return
        }
    }
}

final class ReadinessTests: XCTestCase {
    func testEdgeTriggeredReaderDrainsUntilEAGAINThenSeesPeerClose() throws {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds), 0)
        let flags = fcntl(fds[0], F_GETFL)
        _ = fcntl(fds[0], F_SETFL, flags | O_NONBLOCK)
        let runner = try LoopRunner()
        defer { runner.stop(); close(fds[0]) }
        let eof = expectation(description: "eof seen")
        let reader = DrainingReader(fd: fds[0]) { eof.fulfill() }
        let reg = runner.sync { try! runner.loop.register(fd: fds[0], interest: .read, handler: reader) }

        // Many small writes: each edge must be drained fully or bytes would be stranded.
        let chunk = [UInt8](repeating: 7, count: 1000)
        for _ in 0..<500 { XCTAssertEqual(write(fds[1], chunk, chunk.count), 1000) }
        close(fds[1])
        wait(for: [eof], timeout: 5)
        let (total, hangup) = runner.sync { (reader.total, reader.sawHangupBit) }
        XCTAssertEqual(total, 500_000)
        XCTAssertTrue(hangup, "EPOLLRDHUP reported on peer close")
        runner.sync { runner.loop.deregister(fd: fds[0], registration: reg) }
        XCTAssertEqual(runner.sync { runner.loop.registrationCount }, 0)
    }

    func testEventsForADeregisteredSlotAreNotDeliveredToItsNextOwner() throws {
        var a: [Int32] = [0, 0]
        var b: [Int32] = [0, 0]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &a), 0)
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &b), 0)
        for fd in [a[0], b[0]] { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
        let runner = try LoopRunner()
        defer { runner.stop(); for fd in a + b { close(fd) } }
        let first = DrainingReader(fd: a[0]) {}
        let second = DrainingReader(fd: b[0]) {}
        let (r1, r2) = runner.sync { () -> (Registration, Registration) in
            let r1 = try! runner.loop.register(fd: a[0], interest: .read, handler: first)
            runner.loop.deregister(fd: a[0], registration: r1)
            // Reuses the freed slot with a new generation.
            let r2 = try! runner.loop.register(fd: b[0], interest: .read, handler: second)
            return (r1, r2)
        }
        XCTAssertEqual(r1.slot, r2.slot)
        XCTAssertNotEqual(r1.generation, r2.generation)
        _ = write(a[1], "x", 1)
        _ = write(b[1], "yy", 2)
        let deadline = Date().addingTimeInterval(5)
        while runner.sync({ second.total }) < 2 && Date() < deadline { usleep(1000) }
        XCTAssertEqual(runner.sync { first.wakeups }, 0)
        XCTAssertEqual(runner.sync { second.total }, 2)
    }
}

final class TimerRescheduleFromActionTests: XCTestCase {
    func testTimerRescheduledFromItsOwnActionFiresAgain() throws {
        let runner = try LoopRunner()
        defer { runner.stop() }
        let fired = Mutex<Int>(0)
        let done = expectation(description: "fired three times")
        runner.sync {
            let loop = runner.loop
            var timer: LoopTimer?
            timer = loop.schedule(after: .milliseconds(10)) {
                let n = fired.withLock { $0 += 1; return $0 }
                if n < 3 { loop.reschedule(timer!, after: .milliseconds(10)) } else { done.fulfill() }
            }
        }
        wait(for: [done], timeout: 5)
        XCTAssertEqual(fired.withLock { $0 }, 3)
        XCTAssertEqual(runner.sync { runner.loop.timerCount }, 0)
    }
}
