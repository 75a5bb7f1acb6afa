import XCTest
@testable import Reactor

final class TimerHeapTests: XCTestCase {
    func testRandomInsertsAndRemovalsPopInOrder() {
        var rng = SystemRandomNumberGenerator()
        let heap = TimerHeap()
        var timers: [LoopTimer] = []
        for _ in 0..<2_000 {
            let t = LoopTimer(deadline: UInt64.random(in: 0..<10_000, using: &rng)) {}
            heap.insert(t)
            timers.append(t)
        }
        var removed = Set<ObjectIdentifier>()
        for t in timers.shuffled().prefix(700) {
            heap.remove(t)
            removed.insert(ObjectIdentifier(t))
        }
        XCTAssertEqual(heap.count, 1_300)
        var last: UInt64 = 0
        var popped = 0
        while let t = heap.popDue(now: .max) {
            XCTAssertGreaterThanOrEqual(t.deadline, last)
            XCTAssertFalse(removed.contains(ObjectIdentifier(t)))
            last = t.deadline
            popped += 1
        }
        XCTAssertEqual(popped, 1_300)
    }

    func testPopDueLeavesFutureTimers() {
        let heap = TimerHeap()
        heap.insert(LoopTimer(deadline: 5) {})
        heap.insert(LoopTimer(deadline: 50) {})
        XCTAssertNotNil(heap.popDue(now: 10))
        XCTAssertNil(heap.popDue(now: 10))
        XCTAssertEqual(heap.count, 1)
    }
}
