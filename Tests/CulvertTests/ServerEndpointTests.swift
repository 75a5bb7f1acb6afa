import XCTest
@testable import Culvert

/// A list of servers where each entry is HOST[:PORT] or a ws:// or wss:// URL: each
/// connector gets its own server's transport and path.
final class ServerEndpointTests: XCTestCase {
    private let token = "token = \"client-token-0123456789\"\n[services.web]\nremote_port = 0\nlocal = \"127.0.0.1:80\"\n"

    func testAListMixesURLsAndAddressesEachWithItsTransport() throws {
        let list = try TunnelConfigFile.parseEndpoints("ws://a.example/t, b.example:7001,wss://c.example:8443/x?k=1")
        XCTAssertEqual(list.map(\.description), ["ws://a.example/t", "b.example:7001", "wss://c.example:8443/x?k=1"])
        XCTAssertEqual(list.map(\.transport), [.ws, nil, .wss])
        XCTAssertEqual(list.map(\.address), [HostPort(host: "a.example", port: 80), HostPort(host: "b.example", port: 7001),
                                             HostPort(host: "c.example", port: 8443)])
        XCTAssertThrowsError(try TunnelConfigFile.parseEndpoints("ws://a.example:7000/t,a.example")) { error in
            XCTAssertTrue("\(error)".contains("named twice"), "\(error)")
        }
        XCTAssertThrowsError(try TunnelConfigFile.parseEndpoints("ws://a.example:99999/")) { error in
            XCTAssertTrue("\(error)".contains("invalid WebSocket URL"), "\(error)")
        }
        XCTAssertThrowsError(try TunnelConfigFile.parseServers("ws://a.example/t"), "a URL where only addresses go")
    }

    func testAURLIsNamedAsWrittenAndComparedByWhatItReaches() throws {
        let written = try TunnelConfigFile.parseEndpoints("wss://edge.example:443/tunnel, edge.example")
        XCTAssertEqual(written.map(\.description), ["wss://edge.example:443/tunnel", "edge.example:7000"])
        let respelt = try TunnelConfigFile.parseEndpoints("WSS://edge.example/tunnel,edge.example:7000")
        XCTAssertEqual(written, respelt, "a reload that only respells the list changes nothing that runs")
        XCTAssertNotEqual(written, try TunnelConfigFile.parseEndpoints("wss://edge.example/other,edge.example"))
    }

    func testEachConnectorReachesItsServerOnItsOwnTransport() throws {
        var config = TunnelClientConfig()
        config.endpoints = try TunnelConfigFile.parseEndpoints("wss://a.example/one,b.example,ws://c.example:8080/two")
        config.webSocket.hostHeader = "edge.example"
        let a = config.reaching(config.endpoints[0])
        XCTAssertEqual(a.transport, .wss)
        XCTAssertEqual(a.webSocket.path, "/one")
        XCTAssertEqual(a.webSocket.hostHeader, "edge.example")
        XCTAssertEqual(a.server, HostPort(host: "a.example", port: 443))
        let b = config.reaching(config.endpoints[1])
        XCTAssertEqual(b.transport, .tls, "HOST:PORT keeps the client's transport")
        XCTAssertEqual(b.server, HostPort(host: "b.example", port: 7000))
        let c = config.reaching(config.endpoints[2])
        XCTAssertEqual(c.transport, .ws)
        XCTAssertEqual(c.webSocket.path, "/two")
    }

    func testTheFileAndTheCommandLineTakeURLsInTheList() throws {
        let scratch = try ScratchFiles()
        let file = try scratch.write("list.toml", "servers = [\"ws://127.0.0.1:1/a,b\", \"wss://h.example/b\"]\nsni = \"edge\"\n" + token)
        let config = try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: file).config
        XCTAssertEqual(config.endpoints.map(\.description), ["ws://127.0.0.1:1/a,b", "wss://h.example/b"],
                       "an array entry is one server, commas and all")
        XCTAssertEqual(config.transport, .ws, "all URLs: the first one's transport is the client's")
        XCTAssertEqual(config.webSocket.path, "/a,b")
        XCTAssertEqual(config.webSocket.serverName, "edge")

        var flags = TunnelClientFlags()
        flags.token = TokenFlags(token: "client-token-0123456789")
        flags.services = [try ServiceSpec.parse("0:127.0.0.1:22")]
        flags.endpoints = try TunnelConfigFile.parseEndpoints("127.0.0.1:7000,ws://127.0.0.1:8080/t")
        flags.headers = ["X-Key: 1"]
        flags.ca = "ca.pem"
        let mixed = try TunnelClientConfig.resolve(flags: flags, file: nil).config
        XCTAssertEqual(mixed.transport, .tls, "HOST:PORT servers keep the default transport")
        XCTAssertEqual(mixed.caFile, "ca.pem", "--ca is the TLS server's")
        XCTAssertEqual(mixed.webSocket.headers.map(\.name), ["X-Key"])

        flags.endpoints = try TunnelConfigFile.parseEndpoints("ws://127.0.0.1:7000/t,ws://127.0.0.1:8080/t")
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: flags, file: nil) },
                             key: "--ca", contains: "--ca needs a wss:// server URL")
        flags.ca = nil
        flags.common.transport = .tls
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: flags, file: nil) },
                             key: "--transport", contains: "contradicts the server URL ws://127.0.0.1:7000/t")
        flags.endpoints = try TunnelConfigFile.parseEndpoints("ws://127.0.0.1:7000/t,127.0.0.1:8080")
        XCTAssertEqual(try TunnelClientConfig.resolve(flags: flags, file: nil).config.transport, .tls,
                       "--transport names the transport of the HOST:PORT servers")
    }
}

/// `--proxy env` with several servers: NO_PROXY decides for each one.
final class EnvironmentProxyListTests: XCTestCase {
    func testEachServerIsCheckedAgainstNoProxy() throws {
        var flags = TunnelClientFlags()
        flags.token = TokenFlags(token: "client-token-0123456789")
        flags.services = [try ServiceSpec.parse("0:127.0.0.1:22")]
        flags.endpoints = try TunnelConfigFile.parseEndpoints("wss://inside.corp/t,wss://outside.example/t")
        flags.proxy = "env"
        flags.proxyEnvironment = ["HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": ".corp"]
        let config = try TunnelClientConfig.resolve(flags: flags, file: nil).config
        let proxy = ProxyRoute.http(ProxyEndpoint(address: HostPort(host: "proxy.corp", port: 3128), user: nil, password: nil))
        XCTAssertEqual(config.reaching(config.endpoints[0]).proxy, .direct)
        XCTAssertEqual(config.reaching(config.endpoints[1]).proxy, proxy)
        XCTAssertEqual(config.proxy, .direct, "the preferred server's route")
    }
}
