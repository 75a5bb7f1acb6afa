import XCTest
@testable import Culvert

/// The session cap and idle timeout of a tunnel client's UDP services: flags over the
/// file over the default, which shares `UDPSessionBudget`'s default among the services.
final class ClientUDPLimitsTests: XCTestCase {
    private let token = "client-token-0123456789"

    func testEachUDPServiceGetsAnEqualShareOfTheDefault() {
        XCTAssertEqual(UDPSessionBudget.defaultLimit(freeDescriptors: 500, sharedBy: 1), 250)
        XCTAssertEqual(UDPSessionBudget.defaultLimit(freeDescriptors: 500, sharedBy: 3), 83)
        XCTAssertEqual(UDPSessionBudget.defaultLimit(freeDescriptors: 1 << 20, sharedBy: 4), 2_500, "the ceiling is for all of them")
        XCTAssertEqual(UDPSessionBudget.defaultLimit(freeDescriptors: 2, sharedBy: 8), 1, "never 0, which means no limit")
    }

    func testFlagsOverrideTheFileAndNoneLeavesTheDefault() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("client.toml", """
            server = "127.0.0.1"
            token = "\(token)"
            udp_idle_timeout = "2s"
            udp_max_sessions = 300
            [services.dns]
            remote_port = 5353
            local = "127.0.0.1:53"
            protocol = "udp"
            """)
        var flags = TunnelClientFlags()
        var config = try TunnelClientConfig.resolve(flags: flags, file: path).config
        XCTAssertEqual(config.udpIdleTimeout, .seconds(2))
        XCTAssertEqual(config.udpMaxSessions, 300)
        flags.udpIdleTimeout = .milliseconds(500)
        flags.udpMaxSessions = 0
        config = try TunnelClientConfig.resolve(flags: flags, file: path).config
        XCTAssertEqual(config.udpIdleTimeout, .milliseconds(500))
        XCTAssertEqual(config.udpMaxSessions, 0, "0 stays: no limit")

        let bare = try scratch.write("bare.toml", "server = \"127.0.0.1\"\ntoken = \"\(token)\"\n[services.dns]\nremote_port = 53\nlocal = \"127.0.0.1:53\"\nprotocol = \"udp\"\n")
        config = try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: bare).config
        XCTAssertEqual(config.udpIdleTimeout, .seconds(60))
        XCTAssertNil(config.udpMaxSessions)
    }

    func testBadValuesNameTheFlagOrKey() throws {
        var flags = TunnelClientFlags()
        flags.udpMaxSessions = -1
        XCTAssertConfigError({ () throws(ConfigError) in try flags.check(withFile: true) },
                             key: "--udp-max-sessions", contains: "--udp-max-sessions must be 0 (no limit) or more, got -1")
        flags.udpMaxSessions = nil
        flags.udpIdleTimeout = .zero
        XCTAssertConfigError({ () throws(ConfigError) in try flags.check(withFile: true) },
                             key: "--udp-idle-timeout", contains: "--udp-idle-timeout must be more than 0")

        let scratch = try ScratchFiles()
        let zeroIdle = try scratch.write("idle.toml", "server = \"127.0.0.1\"\ntoken = \"\(token)\"\nudp_idle_timeout = \"0s\"\n")
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: zeroIdle) },
                             key: "udp_idle_timeout", contains: "must be more than 0")
        let negative = try scratch.write("max.toml", "server = \"127.0.0.1\"\ntoken = \"\(token)\"\nudp_max_sessions = -5\n")
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: negative) },
                             key: "udp_max_sessions", contains: "out of range")
    }
}
