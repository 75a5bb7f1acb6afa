import Foundation
import XCTest
@testable import Culvert

/// Where `--send-proxy`, `--accept-proxy` and their config keys land, and what they refuse.
final class ProxyProtocolConfigTests: XCTestCase {
    private let token = "client-token-0123456789"

    func testForwardKeysApplyPerListenerAndFlagsOverrideThem() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("forward.toml", """
            listen = "127.0.0.1:8080"
            targets = ["127.0.0.1:9000"]
            send_proxy = "v1"
            [services.b]
            listen = "127.0.0.1:8081"
            targets = ["127.0.0.1:9001"]
            send_proxy = "v2"
            accept_proxy = true
            """)
        let configs = try TCPForwardConfig.resolve(flags: TCPForwardFlags(listen: nil, targets: []), file: path).config
        XCTAssertEqual(configs.map(\.sendProxy), [.v1, .v2])
        XCTAssertEqual(configs.map(\.acceptProxy), [false, true])
        var flags = TCPForwardFlags(listen: nil, targets: [])
        flags.sendProxy = .v2
        flags.acceptProxy = true
        let overridden = try TCPForwardConfig.resolve(flags: flags, file: path).config
        XCTAssertEqual(overridden.map(\.sendProxy), [.v2, .v2])
        XCTAssertEqual(overridden.map(\.acceptProxy), [true, true])
        let bad = try scratch.write("bad.toml", "listen = \"127.0.0.1:8080\"\ntargets = [\"127.0.0.1:9000\"]\nsend_proxy = \"v3\"\n")
        XCTAssertConfigError({ () throws(ConfigError) in try TCPForwardConfig.resolve(flags: TCPForwardFlags(listen: nil, targets: []), file: bad) },
                             key: "send_proxy", contains: "'v3' is not v1 or v2")
    }

    func testSendProxyIsNotForAWebSocketTarget() throws {
        var flags = TCPForwardFlags(listen: try HostPort.parse("127.0.0.1:8080"), targets: [try HostPort.parse("127.0.0.1:80")])
        flags.egress = WebSocketEgress(url: try WebSocketURL.parse("ws://127.0.0.1/x"))
        flags.sendProxy = .v1
        XCTAssertConfigError({ () throws(ConfigError) in try flags.check() }, key: "--send-proxy", contains: "not to a WebSocket target")
    }

    func testClientSendProxyReachesTCPServicesOnly() throws {
        var flags = TunnelClientFlags()
        flags.server = HostPort(host: "127.0.0.1", port: 7000)
        flags.token = TokenFlags(token: token)
        flags.services = [try ServiceSpec.parse("20022:127.0.0.1:22"), try ServiceSpec.parse("udp:20053:127.0.0.1:53")]
        flags.sendProxy = .v2
        let services = try TunnelClientConfig.resolve(flags: flags, file: nil).config.services
        XCTAssertEqual(services.map(\.proxyProtocol), [.v2, nil])
        flags.services = [try ServiceSpec.parse("udp:20053:127.0.0.1:53")]
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: flags, file: nil) },
                             key: "--send-proxy", contains: "every -R given is UDP")
    }

    func testClientServiceKeyIsForTCPServices() throws {
        let scratch = try ScratchFiles()
        let good = try scratch.write("client.toml", """
            server = "127.0.0.1:7000"
            token = "\(token)"
            [services.web]
            remote_port = 8080
            local = "127.0.0.1:80"
            proxy_protocol = "v1"
            """)
        XCTAssertEqual(try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: good).config.services.first?.proxyProtocol, .v1)
        let udp = try scratch.write("udp.toml", """
            server = "127.0.0.1:7000"
            token = "\(token)"
            [services.dns]
            remote_port = 8053
            local = "127.0.0.1:53"
            protocol = "udp"
            proxy_protocol = "v2"
            """)
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: udp) },
                             key: "services.dns.proxy_protocol", contains: "only TCP services")
    }

    func testServerAcceptProxyFromFlagOrFile() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("server.toml", "token = \"\(token)\"\naccept_proxy = true\n")
        XCTAssertTrue(try TunnelServerConfig.resolve(flags: TunnelServerFlags(), file: path).config.acceptProxy)
        var flags = TunnelServerFlags()
        flags.token = TokenFlags(token: token)
        XCTAssertFalse(try TunnelServerConfig.resolve(flags: flags, file: nil).config.acceptProxy)
        flags.acceptProxy = true
        XCTAssertTrue(try TunnelServerConfig.resolve(flags: flags, file: nil).config.acceptProxy)
    }
}
