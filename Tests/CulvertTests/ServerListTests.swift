import XCTest
@testable import Culvert

/// The client's servers: the order they are tried in, each one's backoff, and how a list
/// of them is written.
final class ServerListTests: XCTestCase {
    private let a = HostPort(host: "a.example", port: 7000)
    private let b = HostPort(host: "b.example", port: 7001)
    private let second: UInt64 = 1_000_000_000

    private func list() -> ServerList {
        ServerList([a, b].map(ServerEndpoint.init), initial: .milliseconds(500), max: .seconds(4))
    }

    func testTheFirstServerNotBackingOffIsTriedAtOnce() {
        var servers = list()
        XCTAssertEqual(servers.next(now: 10 * second).index, 0)
        servers.failed(0, now: 10 * second, jitter: 1)
        let next = servers.next(now: 10 * second)
        XCTAssertEqual(next.index, 1, "a server that just failed is skipped")
        XCTAssertEqual(next.wait, .zero)
    }

    func testWhenEveryServerBacksOffTheClientWaitsForTheSoonest() {
        var servers = list()
        servers.failed(0, now: 10 * second, jitter: 1)
        servers.failed(0, now: 10 * second, jitter: 1)  // 1 s
        servers.failed(1, now: 10 * second, jitter: 1)  // 500 ms
        let next = servers.next(now: 10 * second)
        XCTAssertEqual(next.index, 1)
        XCTAssertEqual(next.wait, .milliseconds(500))
        XCTAssertEqual(servers.next(now: 11 * second).index, 0, "the preferred one once its backoff ends")
    }

    func testBackoffDoublesUpToTheMaximumAndStartsOverOnceServed() {
        var servers = list()
        for _ in 0..<10 { servers.failed(0, now: 0, jitter: 1) }
        XCTAssertEqual(servers[0].retryAt, 4 * second, "capped at the maximum")
        servers.failed(0, now: 0, jitter: 0.5)
        XCTAssertEqual(servers[0].retryAt, 2 * second, "jitter takes off up to half")
        servers.served(0)
        XCTAssertEqual(servers[0].failures, 0)
        servers.failed(0, now: 0, jitter: 1)
        XCTAssertEqual(servers[0].retryAt, second / 2)
    }

    func testServersAreCommaSeparatedEachWithItsDefaultPort() throws {
        XCTAssertEqual(try TunnelConfigFile.parseServers("a.example, b.example:7001,[::1]"),
                       [a, b, HostPort(host: "::1", port: 7000)])
        XCTAssertThrowsError(try TunnelConfigFile.parseServers("a.example,a.example:7000")) { error in
            XCTAssertTrue("\(error)".contains("named twice"), "\(error)")
        }
        XCTAssertThrowsError(try TunnelConfigFile.parseServers("a.example,"))
    }

    func testTheConfigFileNamesServerOrServers() throws {
        let scratch = try ScratchFiles()
        let token = "token = \"client-token-0123456789\"\n[services.web]\nremote_port = 0\nlocal = \"127.0.0.1:80\"\n"
        let list = try scratch.write("list.toml", "servers = [\"a.example\", \"b.example:7001\"]\nfailback_interval = \"2s\"\n" + token)
        let config = try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: list).config
        XCTAssertEqual(config.servers, [a, b])
        XCTAssertEqual(config.failbackInterval, .seconds(2))
        let one = try scratch.write("one.toml", "server = \"a.example\"\n" + token)
        XCTAssertEqual(try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: one).config.servers, [a])
        var flags = TunnelClientFlags()
        flags.servers = [b]
        XCTAssertEqual(try TunnelClientConfig.resolve(flags: flags, file: list).config.servers, [b], "the command line wins")
        let both = try scratch.write("both.toml", "server = \"a.example\"\nservers = [\"b.example\"]\n" + token)
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: both) },
                             key: "servers", contains: "not both")
    }
}
