import Foundation
import XCTest
@testable import Culvert

/// Temporary files for one test, removed at the end.
final class ScratchFiles {
    let directory: String

    init() throws {
        directory = NSTemporaryDirectory() + "culvert-config-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: directory) }

    /// Writes `text` to `name` in the directory and returns its path.
    func write(_ name: String, _ text: String) throws -> String {
        let path = directory + "/" + name
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }
}

/// Asserts that `body` fails with a ConfigError naming `key` whose text contains `text`.
func XCTAssertConfigError<T>(_ body: () throws(ConfigError) -> T, key: String?, contains text: String,
                             file: StaticString = #filePath, line: UInt = #line) {
    do {
        let value = try body()
        XCTFail("expected an error naming \(key ?? "nothing"), got \(value)", file: file, line: line)
    } catch {
        XCTAssertEqual(error.key, key, "\(error)", file: file, line: line)
        XCTAssertTrue(error.description.contains(text), "\(error.description) does not contain \(text)", file: file, line: line)
    }
}

final class TunnelServerResolveTests: XCTestCase {
    private let longToken = "0123456789abcdef0123"

    func testFlagsOverrideTheFileAndTheFileOverridesDefaults() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("server.toml", """
            listen = ["127.0.0.1:7100", "[::1]:7100"]
            token = "\(longToken)"
            allow_ports = "20000-20100"
            max_clients = 10
            max_services = 5
            heartbeat_interval = "2s"
            log_level = "debug"
            """)
        var flags = TunnelServerFlags()
        flags.maxClients = 20
        flags.common.heartbeatMisses = 7
        flags.log.format = .json
        let resolved = try TunnelServerConfig.resolve(flags: flags, file: path)
        let config = resolved.config
        XCTAssertEqual(config.listen, [HostPort(host: "127.0.0.1", port: 7100), HostPort(host: "::1", port: 7100)])
        XCTAssertEqual(config.token, longToken)
        XCTAssertEqual(config.allowPorts, PortRanges([20000...20100]))
        XCTAssertEqual(config.maxClients, 20, "the flag wins over the file")
        XCTAssertEqual(config.maxServicesPerClient, 5, "the file wins over the default")
        XCTAssertEqual(config.maxUnauthenticated, 128, "the default stays when neither sets it")
        XCTAssertEqual(config.heartbeat.interval, .seconds(2))
        XCTAssertEqual(config.heartbeat.misses, 7)
        XCTAssertEqual(resolved.log.level, .debug)
        XCTAssertEqual(resolved.log.format, .json)
        XCTAssertEqual(resolved.warnings, [])
    }

    func testAMissingFileIsNamed() {
        var flags = TunnelServerFlags()
        flags.token.environment = longToken
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelServerConfig.resolve(flags: flags, file: "/nonexistent/server.toml") },
                             key: nil, contains: "config /nonexistent/server.toml: cannot read the file")
    }

    func testFileErrorsNameTheFileAndKey() throws {
        let scratch = try ScratchFiles()
        let cases: [(String, String, String)] = [
            ("max_clients = 0", "max_clients", "0 is out of range 1-100000"),
            ("bind_addr = \"example.com\"", "bind_addr", "'example.com' is not a numeric IP address"),
            ("transport = \"quic\"", "transport", "'quic' is not tls, plain, ws or wss"),
            ("listn = \":7000\"", "listn", "unknown key"),
            ("cert = \"/etc/cert.pem\"", "key", "cert and key go together"),
        ]
        for (i, (text, key, message)) in cases.enumerated() {
            let path = try scratch.write("bad\(i).toml", text + "\ntoken = \"\(longToken)\"\n")
            XCTAssertConfigError({ () throws(ConfigError) in try TunnelServerConfig.resolve(flags: TunnelServerFlags(), file: path) },
                                 key: key, contains: "config \(path): \(key): \(message)")
        }
    }

    func testFlagErrorsNameTheFlag() {
        var flags = TunnelServerFlags()
        flags.token.environment = longToken
        flags.maxUnauthenticated = 0
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelServerConfig.resolve(flags: flags, file: nil) },
                             key: "--max-unauthenticated", contains: "--max-unauthenticated must be at least 1, got 0")
        flags.maxUnauthenticated = nil
        flags.cert = "/etc/cert.pem"
        XCTAssertConfigError({ () throws(ConfigError) in try flags.check() }, key: "--key", contains: "--cert and --key go together")
        flags.key = "/etc/key.pem"
        flags.common.transport = .plain
        XCTAssertConfigError({ () throws(ConfigError) in try flags.check() }, key: "--cert", contains: "--cert needs --transport tls")
    }

    func testACertificateFromTheFileNeedsTLSFromTheFlags() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("server.toml", "cert = \"c.pem\"\nkey = \"k.pem\"\ntoken = \"\(longToken)\"\n")
        var flags = TunnelServerFlags()
        flags.common.transport = .plain
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelServerConfig.resolve(flags: flags, file: path) },
                             key: "transport", contains: "a certificate needs transport tls")
    }

    func testTokenComesFromTheFirstSourceGiven() throws {
        let scratch = try ScratchFiles()
        let tokenFile = try scratch.write("token", "from-the-token-file\nsecond line ignored\n")
        let configFile = try scratch.write("server.toml", "token = \"from-the-config-file\"\n")
        var flags = TunnelServerFlags()
        flags.token = TokenFlags(tokenFile: tokenFile, environment: "from-the-environment", token: "from-the-command-line")
        XCTAssertEqual(try TunnelServerConfig.resolve(flags: flags, file: configFile).config.token, "from-the-token-file")
        flags.token.tokenFile = nil
        XCTAssertEqual(try TunnelServerConfig.resolve(flags: flags, file: configFile).config.token, "from-the-environment")
        flags.token.environment = nil
        let fromFlag = try TunnelServerConfig.resolve(flags: flags, file: configFile)
        XCTAssertEqual(fromFlag.config.token, "from-the-command-line")
        XCTAssertTrue(fromFlag.warnings.contains { $0.contains("--token is visible") }, "\(fromFlag.warnings)")
        flags.token.token = nil
        XCTAssertEqual(try TunnelServerConfig.resolve(flags: flags, file: configFile).config.token, "from-the-config-file")
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelServerConfig.resolve(flags: flags, file: nil) },
                             key: "--token-file", contains: "no token: give --token-file FILE or set CULVERT_TOKEN")
    }

    func testAnUnreadableTokenFileNamesTheFlagAndTheReason() {
        var flags = TunnelServerFlags()
        flags.token.tokenFile = "/nonexistent/token"
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelServerConfig.resolve(flags: flags, file: nil) },
                             key: "--token-file", contains: "cannot read --token-file '/nonexistent/token': no such file (ENOENT)")
    }

    func testABadLogLevelInTheFileIsNamed() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("server.toml", "log_level = \"loud\"\ntoken = \"\(longToken)\"\n")
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelServerConfig.resolve(flags: TunnelServerFlags(), file: path) },
                             key: "log_level", contains: "log_level 'loud' is not a log level")
    }
}

final class TunnelClientResolveTests: XCTestCase {
    func testTwoServicesOnOnePortOrANamedBindAreUsageErrors() throws {
        var flags = TunnelClientFlags()
        flags.server = HostPort(host: "127.0.0.1", port: 7000)
        flags.token = TokenFlags(token: "client-token-0123456789")
        flags.services = [try ServiceSpec.parse("20022:127.0.0.1:22"), try ServiceSpec.parse("20022:127.0.0.1:2222")]
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: flags, file: nil) },
                             key: "-R", contains: "services '20022:127.0.0.1:22' and '20022:127.0.0.1:2222' both ask for tcp port 20022")
        // the same number for TCP and UDP, or port 0 twice, is fine
        flags.services = [try ServiceSpec.parse("20022:127.0.0.1:22"), try ServiceSpec.parse("udp:20022:127.0.0.1:53"),
                          try ServiceSpec.parse("0:127.0.0.1:1"), try ServiceSpec.parse("0:127.0.0.1:2")]
        XCTAssertEqual(try TunnelClientConfig.resolve(flags: flags, file: nil).config.services.count, 4)
        XCTAssertThrowsError(try ServiceSpec.parse("myhost:20022:127.0.0.1:22")) { error in
            XCTAssertTrue("\(error)".contains("BIND 'myhost' is not a numeric IP address"), "\(error)")
        }
        XCTAssertEqual(try ServiceSpec.parse("[::1]:20022:127.0.0.1:22").bindHost, "::1")
    }

    private let clientFile = """
        server = "tunnel.example:7100"
        token = "client-token-0123456789"
        mux = 4
        pool = 3

        [services.web]
        remote_port = 8080
        local = "127.0.0.1:80"

        [services.dns]
        remote_port = 5353
        local = "127.0.0.1:53"
        protocol = "udp"

        [services.db]
        secret = true
        local = "127.0.0.1:5432"
        token = "db-service-token-0123456789"
        """

    func testFlagsOverrideTheFileAndServicesAreNumberedInMergedOrder() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("client.toml", clientFile)
        var flags = TunnelClientFlags()
        flags.mux = 0
        flags.compress = true
        flags.services = [try ServiceSpec.parse("udp:0:127.0.0.1:9")]
        flags.secrets = [try ServiceSpec.parseSecret("ssh=127.0.0.1:22")]
        let config = try TunnelClientConfig.resolve(flags: flags, file: path).config
        XCTAssertEqual(config.server, HostPort(host: "tunnel.example", port: 7100))
        XCTAssertEqual(config.token, "client-token-0123456789")
        XCTAssertEqual(config.mux, 0, "the flag wins over the file")
        XCTAssertEqual(config.pool, 3, "the file wins over the default")
        XCTAssertEqual(config.services.map(\.name), ["db", "dns", "web", "udp:0:127.0.0.1:9", "ssh"],
                       "the file's services sorted by name, then -R, then --secret")
        XCTAssertEqual(config.services.map(\.id), [0, 1, 2, 3, 4])
        XCTAssertEqual(config.services.map(\.kind), [.secret, .udp, .tcp, .udp, .secret])
        XCTAssertEqual(config.services.map(\.compress), [false, false, false, true, false], "--compress is for -R services")
        XCTAssertEqual(config.services[0].serviceToken, "db-service-token-0123456789")
        XCTAssertNil(config.visit)
    }

    func testASecretServiceCannotBeUDP() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("client.toml", """
            server = "127.0.0.1"
            token = "client-token-0123456789"
            [services.db]
            secret = true
            local = "127.0.0.1:5432"
            protocol = "udp"
            """)
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: path) },
                             key: "services.db.protocol", contains: "secret services are TCP only")
    }

    func testKindIsTheOneTruth() throws {
        let udp = try ServiceSpec.parse("udp:5353:127.0.0.1:53")
        XCTAssertEqual(udp.kind, .udp)
        XCTAssertEqual(udp.kindName, "udp")
        let secret = try ServiceSpec.parseSecret("db=127.0.0.1:5432")
        XCTAssertEqual(secret.kind, .secret)
        XCTAssertEqual(secret.kindName, "tcp")
        XCTAssertEqual(try ServiceSpec.parse("tcp:8080:127.0.0.1:80").kind, .tcp)
        XCTAssertEqual(try ServiceSpec.parse("8080:127.0.0.1:80").kind, .tcp)
    }

    func testWithoutAFileTheFlagsMustNameServerAndServices() {
        var flags = TunnelClientFlags()
        flags.token.environment = "client-token-0123456789"
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: flags, file: nil) },
                             key: "<server>", contains: "missing <server>: give HOST[:PORT], ws://HOST[:PORT]/PATH or wss://… of the culvert server")
        flags.server = HostPort(host: "127.0.0.1", port: 7000)
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: flags, file: nil) },
                             key: "-R", contains: "nothing to expose")
    }

    func testAFileWithoutServerOrServicesIsRefusedAfterMerging() throws {
        let scratch = try ScratchFiles()
        let noServer = try scratch.write("a.toml", "token = \"client-token-0123456789\"\n")
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: noServer) },
                             key: "<server>", contains: "server = \"HOST:PORT\" in the config file")
        var flags = TunnelClientFlags()
        flags.server = HostPort(host: "127.0.0.1", port: 7000)
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: flags, file: noServer) },
                             key: "-R", contains: "nothing to expose: give -R, --secret or [services.NAME] in the config file")
    }

    func testFlagErrorsNameTheFlag() {
        var flags = TunnelClientFlags()
        flags.server = HostPort(host: "127.0.0.1", port: 7000)
        flags.secrets = [ServiceSpec(name: "db", kind: .secret, bindHost: nil, remotePort: 0, localHost: "127.0.0.1", localPort: 1)]
        flags.mux = 17
        XCTAssertConfigError({ () throws(ConfigError) in try flags.check(withFile: false) },
                             key: "--mux", contains: "--mux must be between 0 and 16, got 17")
        flags.mux = nil
        flags.common.heartbeatMisses = 0
        XCTAssertConfigError({ () throws(ConfigError) in try flags.check(withFile: false) },
                             key: "--heartbeat-misses", contains: "--heartbeat-misses must be at least 1")
        flags.common.heartbeatMisses = nil
        flags.localListen = HostPort(host: "127.0.0.1", port: 2222)
        XCTAssertConfigError({ () throws(ConfigError) in try flags.check(withFile: false) },
                             key: "-L", contains: "-L only works with --visit NAME")
    }

    func testAPlainTransportFromTheFlagsRefusesTheFilesFingerprint() throws {
        let scratch = try ScratchFiles()
        let pinned = try scratch.write("pinned.toml", """
            server = "127.0.0.1"
            token = "client-token-0123456789"
            fingerprint = "sha256:\(String(repeating: "ab", count: 32))"
            [services.web]
            remote_port = 0
            local = "127.0.0.1:80"
            """)
        var flags = TunnelClientFlags()
        flags.common.transport = .plain
        XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: flags, file: pinned) },
                             key: "transport", contains: "ca and fingerprint need transport tls")
    }

    func testAVisitCarriesItsServiceToken() throws {
        let scratch = try ScratchFiles()
        let serviceToken = try scratch.write("db.token", "db-service-token-0123456789\n")
        var flags = TunnelClientFlags()
        flags.server = HostPort(host: "127.0.0.1", port: 7000)
        flags.token.environment = "client-token-0123456789"
        flags.visit = "db"
        flags.localListen = HostPort(host: "127.0.0.1", port: 15432)
        flags.serviceTokenFile = serviceToken
        let config = try TunnelClientConfig.resolve(flags: flags, file: nil).config
        XCTAssertEqual(config.visit, VisitSpec(name: "db", listen: HostPort(host: "127.0.0.1", port: 15432), serviceToken: "db-service-token-0123456789"))
        XCTAssertEqual(config.services, [])
    }
}

final class ForwardResolveTests: XCTestCase {
    private let listen = HostPort(host: "127.0.0.1", port: 0)
    private let target = HostPort(host: nil, port: 9)

    func testTCPFlagsOverrideDefaults() throws {
        var flags = TCPForwardFlags(listen: listen, targets: [target])
        flags.maxConnections = 5
        flags.noSplice = true
        flags.log.level = .debug
        let resolved = try TCPForwardConfig.resolve(flags: flags)
        XCTAssertEqual(resolved.config.targets, [HostPort(host: "127.0.0.1", port: 9)])
        XCTAssertEqual(resolved.config.maxConnections, 5)
        XCTAssertFalse(resolved.config.splice)
        XCTAssertEqual(resolved.config.connectTimeout, .seconds(5))
        XCTAssertEqual(resolved.log.level, .debug)
        XCTAssertEqual(resolved.log.format, .text)
    }

    func testTCPErrorsNameTheArgument() {
        XCTAssertConfigError({ () throws(ConfigError) in try TCPForwardConfig.resolve(flags: TCPForwardFlags(listen: listen, targets: [])) },
                             key: "<targets>", contains: "missing <targets>")
        var flags = TCPForwardFlags(listen: listen, targets: [target])
        flags.threads = 0
        XCTAssertConfigError({ () throws(ConfigError) in try TCPForwardConfig.resolve(flags: flags) },
                             key: "--threads", contains: "--threads must be between 1 and 1024, got 0")
        flags.threads = nil
        flags.connectTimeout = .zero
        XCTAssertConfigError({ () throws(ConfigError) in try TCPForwardConfig.resolve(flags: flags) },
                             key: "--connect-timeout", contains: "--connect-timeout must be more than 0")
    }

    func testUDPFlagsOverrideDefaultsAndErrorsNameTheFlag() throws {
        var flags = UDPForwardFlags(listen: listen, targets: [target])
        flags.socketBuffer = 1 << 20
        XCTAssertEqual(try UDPForwardConfig.resolve(flags: flags).config.socketBuffer, 1 << 20)
        XCTAssertEqual(try UDPForwardConfig.resolve(flags: flags).config.idleTimeout, .seconds(60))
        flags.maxSessions = -1
        XCTAssertConfigError({ () throws(ConfigError) in try UDPForwardConfig.resolve(flags: flags) },
                             key: "--max-sessions", contains: "--max-sessions must be 0 (no limit) or more, got -1")
    }
}

final class PipeResolveTests: XCTestCase {
    func testADirectPipeNeedsNoToken() throws {
        var flags = PipeFlags()
        flags.target = HostPort(host: "127.0.0.1", port: 22)
        let resolved = try PipeConfig.resolve(flags: flags)
        guard case .address(let target, let timeout) = resolved.config else { return XCTFail("\(resolved.config)") }
        XCTAssertEqual(target, HostPort(host: "127.0.0.1", port: 22))
        XCTAssertEqual(timeout, .seconds(5))
        XCTAssertEqual(resolved.log.level, .warning, "stdout carries data, so the pipe logs little")
    }

    func testASecretServicePipeGoesThroughTheServer() throws {
        var flags = PipeFlags()
        flags.via = HostPort(host: "tunnel.example", port: 7000)
        flags.service = "db"
        flags.token.environment = "client-token-0123456789"
        flags.transport = .plain
        let resolved = try PipeConfig.resolve(flags: flags)
        guard case .secretService(let name, let serviceToken, let tunnel) = resolved.config else { return XCTFail("\(resolved.config)") }
        XCTAssertEqual(name, "db")
        XCTAssertNil(serviceToken)
        XCTAssertEqual(tunnel.server, HostPort(host: "tunnel.example", port: 7000))
        XCTAssertEqual(tunnel.token, "client-token-0123456789")
        XCTAssertEqual(tunnel.transport, .plain)
    }

    func testConflictingDestinationsNameTheFlag() {
        var flags = PipeFlags()
        flags.via = HostPort(host: "tunnel.example", port: 7000)
        XCTAssertConfigError({ () throws(ConfigError) in try PipeConfig.resolve(flags: flags) },
                             key: "--service", contains: "--via needs --service NAME")
        flags.target = HostPort(host: "127.0.0.1", port: 22)
        XCTAssertConfigError({ () throws(ConfigError) in try PipeConfig.resolve(flags: flags) },
                             key: "<target>", contains: "not both")
    }
}
