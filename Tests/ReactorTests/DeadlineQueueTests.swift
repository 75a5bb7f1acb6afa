import Foundation
import Synchronization
import XCTest
@testable import Reactor

final class DeadlineQueueTests: XCTestCase {
    func testQueuedTimersFireInOrderAndCancelledOnesNever() throws {
        let runner = try LoopRunner()
        defer { runner.stop() }
        let fired = Mutex<[String]>([])
        let done = expectation(description: "last timer fired")
        let started = MonotonicClock.now()
        runner.sync {
            let loop = runner.loop
            let first = loop.scheduleQueued(after: .milliseconds(40)) { fired.withLock { $0.append("never-1") } }
            _ = loop.scheduleQueued(after: .milliseconds(40)) { fired.withLock { $0.append("a") } }
            let middle = loop.scheduleQueued(after: .milliseconds(40)) { fired.withLock { $0.append("never-2") } }
            _ = loop.scheduleQueued(after: .milliseconds(40)) {
                fired.withLock { $0.append("b") }
                // A timer started from a firing one waits a whole delay of its own.
                _ = loop.scheduleQueued(after: .milliseconds(40)) { fired.withLock { $0.append("c") }; done.fulfill() }
            }
            loop.cancel(first)
            loop.cancel(middle)
            loop.cancel(middle)
        }
        wait(for: [done], timeout: 5)
        XCTAssertEqual(fired.withLock { $0 }, ["a", "b", "c"])
        XCTAssertGreaterThanOrEqual(MonotonicClock.now() - started, 80_000_000)
        XCTAssertEqual(runner.sync { runner.loop.timerCount }, 0)
    }

    func testTimerAddedAfterTheHeadWasCancelledStillFires() throws {
        let runner = try LoopRunner()
        defer { runner.stop() }
        let done = expectation(description: "second timer fired")
        runner.sync {
            let loop = runner.loop
            loop.cancel(loop.scheduleQueued(after: .milliseconds(30)) { XCTFail("cancelled timer fired") })
            // The head timer armed for the cancelled entry is still armed: it must pass
            // the queue on to this one rather than end it.
            _ = loop.scheduleQueued(after: .milliseconds(30)) { done.fulfill() }
            XCTAssertEqual(loop.timerCount, 1)
        }
        wait(for: [done], timeout: 5)
        XCTAssertEqual(runner.sync { runner.loop.timerCount }, 0)
    }

    func testManyCancelledTimersLeaveNothingPending() throws {
        let runner = try LoopRunner()
        defer { runner.stop() }
        let count = runner.sync {
            let loop = runner.loop
            var kept: [QueuedTimer] = []
            for i in 0..<5000 {
                let t = loop.scheduleQueued(after: .seconds(60)) { XCTFail("timer \(i) fired") }
                if i % 3 == 0 { loop.cancel(t) } else { kept.append(t) }
            }
            for t in kept.reversed() { loop.cancel(t) }
            return loop.timerCount
        }
        XCTAssertEqual(count, 0)
    }
}
