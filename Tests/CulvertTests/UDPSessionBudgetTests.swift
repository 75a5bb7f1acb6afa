#if canImport(Glibc)
import Glibc
#endif
import XCTest
@testable import Culvert

final class UDPSessionBudgetTests: XCTestCase {
    func testDefaultIsHalfTheFreeDescriptorsAtMost10000() {
        XCTAssertEqual(UDPSessionBudget.defaultLimit(freeDescriptors: 244), 122)
        XCTAssertEqual(UDPSessionBudget.defaultLimit(freeDescriptors: 20_001), 10_000)
        XCTAssertEqual(UDPSessionBudget.defaultLimit(freeDescriptors: 1 << 20), 10_000)
        XCTAssertEqual(UDPSessionBudget.defaultLimit(freeDescriptors: Int.max), 10_000)
    }

    func testDefaultIsNeverZeroWhichWouldMeanNoLimit() {
        XCTAssertEqual(UDPSessionBudget.defaultLimit(freeDescriptors: 0), 1)
        XCTAssertEqual(UDPSessionBudget.defaultLimit(freeDescriptors: 1), 1)
    }

    func testFreeDescriptorsCountsTheOnesOpenNow() throws {
        var limit = rlimit()
        XCTAssertEqual(getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit), 0)
        let before = UDPSessionBudget.freeDescriptors()
        XCTAssertLessThan(before, Int(clamping: limit.rlim_cur))
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(UDPSessionBudget.freeDescriptors(), before - 1)
    }

    func testNoFlagLeavesTheLimitToTheDescriptorsAndZeroStaysNoLimit() throws {
        var flags = UDPForwardFlags(listen: HostPort(host: "127.0.0.1", port: 0), targets: [HostPort(host: "127.0.0.1", port: 9)])
        XCTAssertNil(try UDPForwardConfig.resolve(flags: flags).config.maxSessions)
        flags.maxSessions = 0
        XCTAssertEqual(try UDPForwardConfig.resolve(flags: flags).config.maxSessions, 0)
        flags.maxSessions = 5
        XCTAssertEqual(try UDPForwardConfig.resolve(flags: flags).config.maxSessions, 5)
    }
}
