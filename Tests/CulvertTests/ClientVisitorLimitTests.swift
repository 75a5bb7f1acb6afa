import Logging
import XCTest
@testable import Culvert

/// The visitor limit of a tunnel client's TCP and secret services: the default share of
/// the free descriptors, the places it counts, and `--max-visitors` over the file.
final class ClientVisitorLimitTests: XCTestCase {
    private let token = "client-token-0123456789"

    func testDefaultIsAnEqualShareOfWhatTheReserveAndUDPLeave() {
        XCTAssertEqual(VisitorLimit.defaultLimit(freeDescriptors: 500, reserve: 66, udpSessions: 0, services: 2, perVisitor: 1), 217)
        XCTAssertEqual(VisitorLimit.defaultLimit(freeDescriptors: 500, reserve: 66, udpSessions: 0, services: 2, perVisitor: 2), 108,
                       "a dedicated data channel per visitor halves it")
        XCTAssertEqual(VisitorLimit.defaultLimit(freeDescriptors: 500, reserve: 66, udpSessions: 250, services: 1, perVisitor: 1), 184)
        XCTAssertEqual(VisitorLimit.defaultLimit(freeDescriptors: 50, reserve: 66, udpSessions: 0, services: 1, perVisitor: 1), 1,
                       "never 0, which means no limit")
    }

    func testAdmitsUpToTheLimitAndReleasesPlaces() {
        let limit = VisitorLimit(max: 2)
        XCTAssertTrue(limit.admit())
        XCTAssertTrue(limit.admit())
        XCTAssertFalse(limit.admit())
        XCTAssertFalse(limit.admit(), "a refusal takes no place")
        limit.release()
        XCTAssertTrue(limit.admit())
        let unlimited = VisitorLimit(max: 0)
        for _ in 0..<1000 { XCTAssertTrue(unlimited.admit()) }
    }

    func testFlagOverridesTheFileAndBadValuesNameIt() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("client.toml", """
            server = "127.0.0.1"
            token = "\(token)"
            max_visitors = 300
            [services.web]
            remote_port = 8080
            local = "127.0.0.1:80"
            """)
        var flags = TunnelClientFlags()
        XCTAssertEqual(try TunnelClientConfig.resolve(flags: flags, file: path).config.maxVisitors, 300)
        flags.maxVisitors = 0
        XCTAssertEqual(try TunnelClientConfig.resolve(flags: flags, file: path).config.maxVisitors, 0, "0 stays: no limit")
        flags.maxVisitors = -1
        XCTAssertConfigError({ () throws(ConfigError) in try flags.check(withFile: true) },
                             key: "--max-visitors", contains: "--max-visitors must be 0 (no limit) or more, got -1")
        let negative = try scratch.write("max.toml", "server = \"127.0.0.1\"\ntoken = \"\(token)\"\nmax_visitors = -5\n")
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: negative) },
                             key: "max_visitors", contains: "out of range")
    }

    func testServicesAReloadAddsGetTheShareAndRemovedOnesGo() throws {
        func spec(_ id: UInt32, _ kind: ServiceSpec.Kind) -> ServiceSpec {
            var s = ServiceSpec(name: "s\(id)", kind: kind, bindHost: nil, remotePort: 0, localHost: "127.0.0.1", localPort: 80)
            s.id = id
            return s
        }
        var config = TunnelClientConfig()
        config.maxVisitors = 7
        let started = [1: VisitorLimit(max: 7), 2: VisitorLimit(max: 7)] as [UInt32: VisitorLimit]
        let now = [spec(2, .tcp), spec(3, .tcp), spec(4, .udp), spec(5, .secret)]
        let updated = VisitorLimit.updated(started, for: now, config: config, udpMaxSessions: 0, logger: Logger(label: "test"))
        XCTAssertEqual(Set(updated.keys), [2, 3, 5], "the removed service's limit goes, UDP services have none")
        XCTAssertTrue(updated[2] === started[2], "a running service keeps its limit and the places counted in it")
        XCTAssertEqual(updated[3]?.max, 7)
        XCTAssertEqual(updated[5]?.max, 7)
        let fromNone = VisitorLimit.updated([:], for: [spec(9, .tcp)], config: config, udpMaxSessions: 0, logger: Logger(label: "test"))
        XCTAssertEqual(fromNone[9]?.max, 7, "a client that started with no TCP service computes the limit then")
    }
}
