import Logging
import XCTest
@testable import Culvert
@testable import Reactor
@testable import Transfer

/// Pending work lives in reused slots: a token that was already removed must not touch
/// the work that took its slot afterwards.
final class RelaySetPendingTests: XCTestCase {
    func testRemovingAStaleTokenLeavesTheSlotsNewOwnerPending() throws {
        let loop = try EventLoop()
        let set = RelaySet(loop: loop, resources: LoopResources(), logger: Logger(label: "test"))
        var cancelled: [String] = []
        let first = set.add { cancelled.append("first") }
        set.remove(pending: first)
        let second = set.add { cancelled.append("second") }
        set.remove(pending: first)
        XCTAssertEqual(set.load, 1, "the stale token removed nothing")
        XCTAssertFalse(set.isIdle)
        set.abortAll(.drainTimeout)
        XCTAssertEqual(cancelled, ["second"])
        set.remove(pending: second)
        set.remove(pending: second)
        XCTAssertEqual(set.load, 0)
        XCTAssertTrue(set.isIdle)
    }
}
