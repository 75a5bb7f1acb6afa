import XCTest
@testable import Culvert
@testable import Transfer

final class TargetSetTests: XCTestCase {
    private func targets(_ n: Int, strategy: BalanceStrategy) -> TargetSet {
        TargetSet(targets: (0..<n).map { i in
            TargetSet.Target(spec: HostPort(host: "127.0.0.1", port: UInt16(9000 + i)),
                             addresses: [SocketAddress(numericHost: "127.0.0.1", port: UInt16(9000 + i))!])
        }, strategy: strategy)
    }

    func testRoundRobinRotatesStartingTarget() {
        let set = targets(3, strategy: .roundRobin)
        let firsts = (0..<6).map { _ in set.attempts(now: 0)[0].target }
        XCTAssertEqual(firsts, [0, 1, 2, 0, 1, 2])
        XCTAssertEqual(set.attempts(now: 0).count, 3, "every target is still a fallback")
    }

    func testFirstIsFailoverInOrderAndDownTargetsGoLast() {
        let set = targets(3, strategy: .first)
        XCTAssertEqual(set.attempts(now: 0).map(\.target), [0, 1, 2])
        let backoff = set.markDown(0, now: 100)
        XCTAssertEqual(backoff, 1_000_000_000)
        XCTAssertEqual(set.attempts(now: 200).map(\.target), [1, 2, 0])
        // Backoff expires: back in first place.
        XCTAssertEqual(set.attempts(now: 100 + backoff).map(\.target), [0, 1, 2])
    }

    func testBackoffDoublesAndResetsOnSuccess() {
        let set = targets(1, strategy: .first)
        XCTAssertEqual(set.markDown(0, now: 0), 1_000_000_000)
        XCTAssertEqual(set.markDown(0, now: 0), 2_000_000_000)
        XCTAssertEqual(set.markDown(0, now: 0), 4_000_000_000)
        for _ in 0..<10 { set.markDown(0, now: 0) }
        XCTAssertEqual(set.markDown(0, now: 0), 60_000_000_000, "capped")
        set.markUp(0)
        XCTAssertFalse(set.isDown(0, now: 1))
        XCTAssertEqual(set.markDown(0, now: 0), 1_000_000_000)
    }

    func testRandomCoversAllTargets() {
        let set = targets(4, strategy: .random)
        var seen = Set<Int>()
        for _ in 0..<400 { seen.insert(set.attempts(now: 0)[0].target) }
        XCTAssertEqual(seen, [0, 1, 2, 3])
    }
}
