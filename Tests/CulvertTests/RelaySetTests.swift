import Foundation
import Glibc
import Logging
import XCTest
@testable import Culvert
@testable import Reactor
@testable import Transfer

final class RelaySetTests: XCTestCase {
    /// Two connected loopback sockets: `outer` for the test, `inner` for the relay.
    private func pair() throws -> (outer: Int32, inner: Int32) {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds), 0)
        _ = fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK)
        return (fds[0], fds[1])
    }

    /// A relay that never ends by itself is reset at the drain deadline; the set reports
    /// it to its close callback and its observer, and says when it is idle.
    func testDrainAbortsWhatIsLeftAtTheDeadline() throws {
        let loop = try EventLoop()
        let thread = Thread { loop.run() }
        thread.start()
        defer { loop.stop() }
        let (x, a) = try pair()
        let (y, b) = try pair()
        defer { close(x); close(y) }
        let done = DispatchSemaphore(value: 0)
        let events = LockedLog()
        Task(executorPreference: loop.tasks) {
            let set = RelaySet(loop: loop, resources: LoopResources(), logger: Logger(label: "test"))
            set.observer = { event in
                switch event {
                case .started: events.append("observer started")
                case .ended(_, let reason): events.append("observer ended \(reason.label)")
                case .retired: events.append("observer retired")
                }
            }
            let pending = set.add()
            set.start(a: TCPStream(fd: a, noDelay: false), b: TCPStream(fd: b, noDelay: false), peer: "test") { _, reason in
                events.append("closed \(reason.label)")
            }
            events.append("load \(set.load) count \(set.count)")
            set.remove(pending: pending)
            set.whenIdle { events.append("idle") }
            await RelaySet.drain([set], on: loop, timeout: .milliseconds(100), logger: Logger(label: "test"))
            events.append("drained, idle \(set.isIdle)")
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(events.lines, [
            "observer started", "load 2 count 1",
            "closed drain-timeout", "observer ended drain-timeout", "idle", "drained, idle true",
        ])
        // The relay reset both of its ends: the test's sockets see the connection gone.
        var byte: UInt8 = 0
        XCTAssertLessThanOrEqual(read(x, &byte, 1), 0)
    }
}

/// Lines appended from the loop thread, read by the test thread after a semaphore.
final class LockedLog: @unchecked Sendable {
    private let lock = NSLock()
    private var storage: [String] = []
    func append(_ line: String) { lock.lock(); storage.append(line); lock.unlock() }
    var lines: [String] { lock.lock(); defer { lock.unlock() }; return storage }
}
