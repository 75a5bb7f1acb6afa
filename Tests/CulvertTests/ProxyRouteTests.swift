import XCTest
@testable import Culvert

/// `--proxy` as the client reads it, and `--proxy env`'s use of HTTPS_PROXY and NO_PROXY.
final class ProxyRouteTests: XCTestCase {
    private let server = HostPort(host: "tunnel.example.com", port: 443)

    func testHTTPProxyWithCredentialsKeepsThemPercentDecoded() throws {
        let route = try ProxyRoute.parse("http://alice:s%40cret@proxy.corp:3128/", environment: [:], server: server)
        XCTAssertEqual(route, .http(ProxyEndpoint(address: HostPort(host: "proxy.corp", port: 3128), user: "alice", password: "s@cret")))
        XCTAssertEqual(route.address(for: server), HostPort(host: "proxy.corp", port: 3128))
    }

    func testSocks5ProxyWithoutCredentials() throws {
        let route = try ProxyRoute.parse("socks5://127.0.0.1:1080", environment: [:], server: server)
        XCTAssertEqual(route, .socks5(ProxyEndpoint(address: HostPort(host: "127.0.0.1", port: 1080), user: nil, password: nil)))
    }

    func testOtherSchemesAreRefusedWithTheForms() {
        XCTAssertThrowsError(try ProxyRoute.parse("https://proxy:443", environment: [:], server: server)) { error in
            XCTAssertTrue("\(error)".contains("http://[USER:PASS@]HOST:PORT"), "\(error)")
        }
    }

    func testEnvironmentIsUsedUnlessNoProxyExemptsTheServer() throws {
        let env = ["HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "localhost, .example.com"]
        XCTAssertEqual(try ProxyRoute.parse("env", environment: env, server: server), .direct)
        let other = HostPort(host: "tunnel.example.org", port: 443)
        XCTAssertEqual(try ProxyRoute.parse("env", environment: env, server: other),
                       .http(ProxyEndpoint(address: HostPort(host: "proxy.corp", port: 3128), user: nil, password: nil)))
        XCTAssertEqual(try ProxyRoute.parse("env", environment: [:], server: other), .direct)
    }

    func testWebSocketOptionsNeedAWebSocketURL() {
        var flags = TunnelClientFlags()
        flags.server = HostPort(host: "127.0.0.1", port: 7000)
        flags.services = [try! ServiceSpec.parse("0:127.0.0.1:22")]
        flags.sni = "edge.example.com"
        XCTAssertThrowsError(try flags.check(withFile: false)) { error in
            XCTAssertTrue("\(error)".contains("--sni needs the server as a ws:// or wss:// URL"), "\(error)")
        }
    }
}
