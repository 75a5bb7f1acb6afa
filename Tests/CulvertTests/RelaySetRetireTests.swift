import Foundation
import Logging
import XCTest
@testable import Culvert
@testable import Reactor
@testable import Transfer

/// A retired relay set tells its observer when it is done, which is when a meter that
/// holds the set lets it go.
final class RelaySetRetireTests: XCTestCase {
    func testRetiredSetTellsItsObserverOnceIdle() throws {
        let loop = try EventLoop()
        let thread = Thread { loop.run() }
        thread.start()
        defer { loop.stop() }
        let done = DispatchSemaphore(value: 0)
        let events = LockedLog()
        Task(executorPreference: loop.tasks) {
            let group = RelayGroup(loop: loop, logger: Logger(label: "test"))
            let set = group.makeSet()
            set.observer = { event in
                if case .retired(let retired) = event { events.append("retired, same set \(retired === set)") }
            }
            let pending = set.add()
            group.retire(set)
            events.append("retire asked")
            set.remove(pending: pending)
            events.append("group count \(group.count)")
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(events.lines, ["retire asked", "retired, same set true", "group count 0"])
    }

    /// The meter stops adding a retired set's in-flight bytes and keeps what its
    /// relays counted.
    func testMeterLetsGoOfARetiredSet() throws {
        let loop = try EventLoop()
        let thread = Thread { loop.run() }
        thread.start()
        defer { loop.stop() }
        let done = DispatchSemaphore(value: 0)
        let result = LockedLog()
        Task(executorPreference: loop.tasks) {
            let group = RelayGroup(loop: loop, logger: Logger(label: "test"))
            let meters = LoopMeters(loop: loop)
            let meter = meters.service("svc", kind: "tcp")
            weak var released: RelaySet?
            do {
                let set = group.makeSet()
                released = set
                meter.watch(set)
                group.retire(set)
            }
            result.append("set released \(released == nil)")
            result.append("active \(meter.sample().active)")
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(result.lines, ["set released true", "active 0"])
    }
}
