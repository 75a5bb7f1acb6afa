import Foundation
import XCTest
@testable import Culvert

/// Tokens are refused when shorter than 16 bytes, empty or only whitespace, from every
/// place a token can come from; token files are read with limits, reasons and a warning.
final class TokenRulesTests: XCTestCase {
    private let good = "0123456789abcdef"

    private func server(_ token: TokenFlags, file: String? = nil) throws(ConfigError) -> Resolved<TunnelServerConfig> {
        var flags = TunnelServerFlags()
        flags.token = token
        return try TunnelServerConfig.resolve(flags: flags, file: file)
    }

    private func client(_ token: TokenFlags, serviceTokenFile: String? = nil) throws(ConfigError) -> Resolved<TunnelClientConfig> {
        var flags = TunnelClientFlags()
        flags.server = HostPort(host: "127.0.0.1", port: 7000)
        flags.secrets = [try! ServiceSpec.parseSecret("db=127.0.0.1:5432")]
        flags.token = token
        flags.serviceTokenFile = serviceTokenFile
        return try TunnelClientConfig.resolve(flags: flags, file: nil)
    }

    private func tokenFile(_ scratch: ScratchFiles, _ name: String, _ text: String, mode: Int = 0o600) throws -> String {
        let path = try scratch.write(name, text)
        try FileManager.default.setAttributes([.posixPermissions: mode], ofItemAtPath: path)
        return path
    }

    func testSixteenBytesIsEnoughAndFifteenIsNot() throws {
        XCTAssertEqual(try server(TokenFlags(environment: good)).config.token, good)
        XCTAssertConfigError({ () throws(ConfigError) in try server(TokenFlags(environment: String(good.dropLast()))) },
                             key: "CULVERT_TOKEN",
                             contains: "the token from CULVERT_TOKEN is too short (15 bytes); a token needs at least 16 bytes: make one with 'culvert token'")
    }

    func testEmptyAndWhitespaceTokensAreRefusedOnBothEnds() {
        let cases: [(TokenFlags, String, String)] = [
            (TokenFlags(environment: ""), "CULVERT_TOKEN", "the token from CULVERT_TOKEN is empty"),
            (TokenFlags(environment: " \t  "), "CULVERT_TOKEN", "the token from CULVERT_TOKEN is only whitespace"),
            (TokenFlags(token: ""), "--token", "the token from --token is empty"),
            (TokenFlags(token: "short"), "--token", "the token from --token is too short (5 bytes)"),
            (TokenFlags(token: "   0123456789abcde   "), "--token", "is too short (15 bytes)"),
        ]
        for (token, key, text) in cases {
            XCTAssertConfigError({ () throws(ConfigError) in try server(token) }, key: key, contains: text)
            XCTAssertConfigError({ () throws(ConfigError) in try server(token) }, key: key, contains: "'culvert token'")
            XCTAssertConfigError({ () throws(ConfigError) in try client(token) }, key: key, contains: text)
        }
    }

    func testTheConfigFileKeyIsNamed() throws {
        let scratch = try ScratchFiles()
        let short = try tokenFile(scratch, "short.token", "short\n")
        let inline = try scratch.write("inline.toml", "token = \"\"\n")
        XCTAssertConfigError({ () throws(ConfigError) in try server(TokenFlags(), file: inline) },
                             key: "token", contains: "config \(inline): token: the token is empty")
        let viaFile = try scratch.write("file.toml", "token_file = \"\(short)\"\n")
        XCTAssertConfigError({ () throws(ConfigError) in try server(TokenFlags(), file: viaFile) },
                             key: "token_file", contains: "config \(viaFile): token_file: the token in '\(short)' is too short (5 bytes)")
        XCTAssertConfigError({ () throws(ConfigError) in try server(TokenFlags(tokenFile: short)) },
                             key: "--token-file", contains: "the token in --token-file '\(short)' is too short (5 bytes)")
    }

    func testAnUnusedWeakTokenInTheFileIsNotAnError() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("server.toml", "token = \"x\"\n")
        XCTAssertEqual(try server(TokenFlags(environment: good), file: path).config.token, good)
    }

    func testServiceTokensFollowTheSameRules() throws {
        let scratch = try ScratchFiles()
        let blank = try tokenFile(scratch, "blank.token", "   \nsecond line\n")
        XCTAssertConfigError({ () throws(ConfigError) in try client(TokenFlags(environment: good), serviceTokenFile: blank) },
                             key: "--service-token-file",
                             contains: "the service token in --service-token-file '\(blank)' is only whitespace")
        for (key, line) in [("token", "token = \"db\""), ("token_file", "token_file = \"\(blank)\"")] {
            let path = try scratch.write("client-\(key).toml", """
                server = "127.0.0.1"
                token = "\(good)"
                [services.db]
                secret = true
                local = "127.0.0.1:5432"
                \(line)
                """)
            XCTAssertConfigError({ () throws(ConfigError) in try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: path) },
                                 key: "services.db.\(key)", contains: "config \(path): services.db.\(key): the service token")
        }
        var pipe = PipeFlags()
        pipe.via = HostPort(host: "127.0.0.1", port: 7000)
        pipe.service = "db"
        pipe.token.environment = good
        pipe.serviceTokenFile = blank
        XCTAssertConfigError({ () throws(ConfigError) in try PipeConfig.resolve(flags: pipe) },
                             key: "--service-token-file", contains: "is only whitespace")
        pipe.serviceTokenFile = nil
        pipe.token.environment = "tiny"
        XCTAssertConfigError({ () throws(ConfigError) in try PipeConfig.resolve(flags: pipe) },
                             key: "CULVERT_TOKEN", contains: "the token from CULVERT_TOKEN is too short (4 bytes)")
    }

    func testTokenFileErrorsTellMissingPermissionAndDirectoryApart() throws {
        let scratch = try ScratchFiles()
        XCTAssertConfigError({ () throws(ConfigError) in try server(TokenFlags(tokenFile: scratch.directory + "/none")) },
                             key: "--token-file", contains: "cannot read --token-file '\(scratch.directory)/none': no such file (ENOENT)")
        XCTAssertConfigError({ () throws(ConfigError) in try server(TokenFlags(tokenFile: scratch.directory)) },
                             key: "--token-file", contains: "cannot read --token-file '\(scratch.directory)': it is a directory (EISDIR)")
        // Root reads any ordinary file; sysctl files check their mode bits even for root.
        let locked = geteuid() == 0 ? "/proc/sys/vm/drop_caches" : try tokenFile(scratch, "locked", good, mode: 0)
        guard access(locked, F_OK) == 0 else { throw XCTSkip("\(locked) is not there to test EACCES with") }
        XCTAssertConfigError({ () throws(ConfigError) in try server(TokenFlags(tokenFile: locked)) },
                             key: "--token-file", contains: "cannot read --token-file '\(locked)': permission denied (EACCES)")
    }

    func testATokenFileIsReadUpToFourKiB() throws {
        let scratch = try ScratchFiles()
        let padding = String(repeating: "#", count: TokenRules.maximumFileBytes - good.utf8.count - 1)
        let full = try tokenFile(scratch, "full", good + "\n" + padding)
        XCTAssertEqual(try server(TokenFlags(tokenFile: full)).config.token, good)
        let over = try tokenFile(scratch, "over", good + "\n" + padding + "#")
        XCTAssertConfigError({ () throws(ConfigError) in try server(TokenFlags(tokenFile: over)) },
                             key: "--token-file", contains: "--token-file '\(over)' is larger than 4096 bytes")
    }

    func testATokenFileOthersCanOpenIsWarnedAbout() throws {
        let scratch = try ScratchFiles()
        let open = try tokenFile(scratch, "open", good + "\n", mode: 0o640)
        XCTAssertEqual(try server(TokenFlags(tokenFile: open)).warnings,
                       ["token file '\(open)' can be read or changed by group or others (mode 0640); run chmod 600 '\(open)'"])
        let closed = try tokenFile(scratch, "closed", good + "\n", mode: 0o600)
        XCTAssertEqual(try server(TokenFlags(tokenFile: closed)).warnings, [])
        let serviceToken = try tokenFile(scratch, "service", "service-token-0123456789\n", mode: 0o604)
        XCTAssertEqual(try client(TokenFlags(tokenFile: closed), serviceTokenFile: serviceToken).warnings,
                       ["token file '\(serviceToken)' can be read or changed by group or others (mode 0604); run chmod 600 '\(serviceToken)'"])
        let config = try scratch.write("client.toml", """
            server = "127.0.0.1"
            token_file = "\(closed)"
            [services.db]
            secret = true
            local = "127.0.0.1:5432"
            token_file = "\(serviceToken)"
            """)
        XCTAssertEqual(try TunnelClientConfig.resolve(flags: TunnelClientFlags(), file: config).warnings,
                       ["token file '\(serviceToken)' can be read or changed by group or others (mode 0604); run chmod 600 '\(serviceToken)'"])
    }
}
