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
}
