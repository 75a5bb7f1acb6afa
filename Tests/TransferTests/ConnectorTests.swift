import Foundation
import Glibc
import XCTest
@testable import Reactor
@testable import Transfer

final class ConnectorTests: XCTestCase {
    /// A loopback address nobody listens on: bound, then closed, so connect is refused.
    private func refusedAddress() throws -> SocketAddress {
        let fd = try Net.listen(SocketAddress(numericHost: "127.0.0.1", port: 0)!, reusePort: false)
        let address = try Net.localAddress(fd)
        close(fd)
        return address
    }

    /// Runs a callback-face connector on a loop thread; returns its outcome summary and
    /// the indexes of the attempts that failed.
    private func dial(_ addresses: [SocketAddress], cancelAtOnce: Bool = false) throws -> (String, [Int]) {
        let thread = try LoopThread()
        defer { thread.stop() }
        let done = DispatchSemaphore(value: 0)
        let result = Box<(String, [Int])>()
        thread.loop.execute {
            var failed: [Int] = []
            let connector = Connector(loop: thread.loop, addresses: addresses, timeout: .seconds(5),
                onAttemptFailed: { index, _ in failed.append(index) },
                onDone: { _, outcome in
                    switch outcome {
                    case .connected(let fd, let registration, let index):
                        if let registration { thread.loop.forget(registration: registration) }
                        close(fd)
                        result.value = ("connected \(index)", failed)
                    case .exhausted(let tried, let error):
                        result.value = ("exhausted \(tried) \(error?.errno ?? 0)", failed)
                    case .cancelled:
                        result.value = ("cancelled", failed)
                    }
                    done.signal()
                })
            connector.start()
            if cancelAtOnce { connector.cancel() }
        }
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        return result.value!
    }

    func testConnectsToTheFirstAddressThatAnswers() throws {
        let listener = try Net.listen(SocketAddress(numericHost: "127.0.0.1", port: 0)!, reusePort: false)
        defer { close(listener) }
        let good = try Net.localAddress(listener)
        let (outcome, failed) = try dial([try refusedAddress(), try refusedAddress(), good])
        XCTAssertEqual(outcome, "connected 2")
        XCTAssertEqual(failed, [0, 1])
    }

    func testReportsTheLastErrorWhenNoAddressAnswers() throws {
        let (outcome, failed) = try dial([try refusedAddress(), try refusedAddress()])
        XCTAssertEqual(outcome, "exhausted 2 \(ECONNREFUSED)")
        XCTAssertEqual(failed, [0, 1])
    }

    func testCancelReportsCancelledOnce() throws {
        let listener = try Net.listen(SocketAddress(numericHost: "127.0.0.1", port: 0)!, reusePort: false)
        defer { close(listener) }
        // connect() to loopback may finish at once; then the outcome is known before cancel.
        let (outcome, _) = try dial([try Net.localAddress(listener)], cancelAtOnce: true)
        XCTAssert(outcome == "cancelled" || outcome == "connected 0", outcome)
    }

    func testAsyncFaceThrowsTheConnectError() throws {
        let thread = try LoopThread()
        defer { thread.stop() }
        let address = try refusedAddress()
        let done = DispatchSemaphore(value: 0)
        let errno = Box<Int32>()
        let loop = thread.loop
        Task(executorPreference: loop.tasks) {
            do {
                let fd = try await Connector.connect(to: [address], timeout: .seconds(5), on: loop)
                close(fd)
                errno.value = 0
            } catch let error as SystemError {
                errno.value = error.errno
            } catch {
                errno.value = -1
            }
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(errno.value, ECONNREFUSED)
    }
}
