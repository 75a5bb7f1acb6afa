import Glibc
import Reactor
import Transfer
import XCTest
@testable import Culvert

final class Socks5ParsingTests: XCTestCase {
    func testGreetingWaitsForEveryMethod() {
        XCTAssertEqual(Socks5.parseGreeting([5]), .incomplete)
        XCTAssertEqual(Socks5.parseGreeting([5, 2, 0]), .incomplete)
        XCTAssertEqual(Socks5.parseGreeting([5, 2, 0, 2, 9]), .done([0, 2], consumed: 4))
        guard case .invalid = Socks5.parseGreeting([4, 1, 0]) else { return XCTFail("SOCKS4 is not SOCKS5") }
    }

    func testRequestAddressTypes() {
        let v4: [UInt8] = [5, 1, 0, 1, 10, 1, 2, 3, 0x01, 0xBB]
        XCTAssertEqual(Socks5.parseRequest(Array(v4.dropLast())), .incomplete)
        XCTAssertEqual(Socks5.parseRequest(v4),
                       .done(.init(command: .connect, destination: .address(SocketAddress(numericHost: "10.1.2.3", port: 443)!)), consumed: 10))
        let v6: [UInt8] = [5, 1, 0, 4] + [UInt8](repeating: 0, count: 15) + [1, 0, 80]
        XCTAssertEqual(Socks5.parseRequest(v6),
                       .done(.init(command: .connect, destination: .address(SocketAddress(numericHost: "::1", port: 80)!)), consumed: 22))
        let name: [UInt8] = [5, 3, 0, 3, 11] + Array("example.com".utf8) + [0, 53]
        XCTAssertEqual(Socks5.parseRequest(name), .done(.init(command: .udpAssociate, destination: .name("example.com", port: 53)), consumed: 18))
    }

    func testRequestRefusalsCarryTheirReplyCode() {
        XCTAssertEqual(Socks5.parseRequest([5, 9, 0, 1, 1, 2, 3, 4, 0, 80]), .invalid(.commandNotSupported, "unknown command 9"))
        XCTAssertEqual(Socks5.parseRequest([5, 1, 0, 7, 1, 2, 3, 4, 0, 80]), .invalid(.addressTypeNotSupported, "unknown address type 7"))
        let bad: [UInt8] = [5, 1, 0, 3, 4] + Array("a b!".utf8) + [0, 80]
        XCTAssertEqual(Socks5.parseRequest(bad), .invalid(.hostUnreachable, "not a valid host name"))
        let longLabel = [UInt8](repeating: UInt8(ascii: "a"), count: 64)
        XCTAssertEqual(Socks5.parseRequest([5, 1, 0, 3, 64] + longLabel + [0, 80]), .invalid(.hostUnreachable, "not a valid host name"))
    }

    func testPortZeroIsRefusedButForUDPAssociate() {
        XCTAssertEqual(Socks5.parseRequest([5, 1, 0, 1, 1, 2, 3, 4, 0, 0]), .invalid(.addressTypeNotSupported, "destination port 0"))
        XCTAssertEqual(Socks5.parseRequest([5, 3, 0, 1, 0, 0, 0, 0, 0, 0]),
                       .done(.init(command: .udpAssociate, destination: .address(SocketAddress(numericHost: "0.0.0.0", port: 0)!)), consumed: 10))
    }

    func testDatagramHeaderRoundTrip() {
        let source = SocketAddress(numericHost: "10.0.0.7", port: 5353)!
        let header = Socks5.datagramHeader(source: source)
        XCTAssertEqual(header, [0, 0, 0, 1, 10, 0, 0, 7, 0x14, 0xE9])
        let datagram = header + Array("payload".utf8)
        let parsed = datagram.withUnsafeBytes { Socks5.parseDatagramHeader($0) }
        XCTAssertEqual(parsed, .init(fragment: 0, destination: .address(source), length: 10))
        let named: [UInt8] = [0, 0, 2, 3, 9] + Array("localhost".utf8) + [0, 53] + [1, 2, 3]
        XCTAssertEqual(named.withUnsafeBytes { Socks5.parseDatagramHeader($0) },
                       .init(fragment: 2, destination: .name("localhost", port: 53), length: 16))
        XCTAssertNil([UInt8]([0, 1, 0, 1, 1, 2, 3, 4, 0, 80]).withUnsafeBytes { Socks5.parseDatagramHeader($0) }, "RSV must be zero")
        XCTAssertNil([UInt8]([0, 0, 0, 1, 1, 2]).withUnsafeBytes { Socks5.parseDatagramHeader($0) }, "truncated header")
    }

    func testCredentialsAndReplies() {
        XCTAssertEqual(Socks5.parseCredentials([1, 1, 97, 2, 98]), .incomplete)
        XCTAssertEqual(Socks5.parseCredentials([1, 1, 97, 2, 98, 99]), .done(.init(user: [97], password: [98, 99]), consumed: 6))
        XCTAssertEqual(Socks5.reply(.connectionRefused), [5, 5, 0, 1, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(Socks5.reply(.succeeded, bound: SocketAddress(numericHost: "127.0.0.1", port: 258)), [5, 0, 0, 1, 127, 0, 0, 1, 1, 2])
    }

    func testExitFailuresMapToRepliesAndStatuses() {
        XCTAssertEqual(ProxyFailure(connect: SystemError("connect", errno: ECONNREFUSED)).socksReply, .connectionRefused)
        XCTAssertEqual(ProxyFailure(connect: SystemError("connect", errno: ENETUNREACH)).socksReply, .networkUnreachable)
        XCTAssertEqual(ProxyFailure(connect: SystemError("connect", errno: EHOSTUNREACH)).socksReply, .hostUnreachable)
        XCTAssertEqual(ProxyFailure(connect: SystemError("connect", errno: ETIMEDOUT)).socksReply, .ttlExpired)
        XCTAssertEqual(ProxyFailure.timedOut.httpStatus, .gatewayTimeout)
        XCTAssertEqual(ProxyFailure.notAllowed.httpStatus, .forbidden)
        XCTAssertEqual(ProxyFailure.connectionRefused.httpStatus, .badGateway)
    }
}

final class HTTPProxyParsingTests: XCTestCase {
    func testHeadScanAndLimit() {
        let head = Array("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nrest".utf8)
        XCTAssertEqual(HTTPHead.scan(head, limit: 1024), .complete(head.count - 4))
        XCTAssertEqual(HTTPHead.scan(Array(head.prefix(20)), limit: 1024), .incomplete)
        XCTAssertEqual(HTTPHead.scan(Array(head.prefix(20)), limit: 16), .tooLarge)
    }

    func testParseAndHopByHop() throws {
        let bytes = Array("GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nProxy-Authorization: Basic x\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\n".utf8)
        let head = try HTTPHead.parse(bytes[...], as: .request)
        XCTAssertEqual(head.startLine.0, "GET")
        XCTAssertEqual(head.tokens("connection"), ["close", "x-secret"])
        XCTAssertEqual(head.removingHopByHop().fields.map(\.name), ["Host", "Accept"])
        XCTAssertThrowsError(try HTTPHead.parse(Array("GET / HTTP/2\r\n\r\n".utf8)[...], as: .request))
        XCTAssertThrowsError(try HTTPHead.parse(Array("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n".utf8)[...], as: .request))
    }

    func testBodyFramingRefusesSmuggling() throws {
        func head(_ fields: String) throws -> HTTPHead { try HTTPHead.parse(Array("POST http://a/ HTTP/1.1\r\n\(fields)\r\n".utf8)[...], as: .request) }
        XCTAssertEqual(try HTTPBody.of(request: head("Content-Length: 5\r\n")), .length(5))
        XCTAssertEqual(try HTTPBody.of(request: head("Transfer-Encoding: chunked\r\n")), .chunked)
        XCTAssertEqual(try HTTPBody.of(request: head("")), HTTPBody.none)
        XCTAssertThrowsError(try HTTPBody.of(request: head("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n")))
        XCTAssertThrowsError(try HTTPBody.of(request: head("Content-Length: 5\r\nContent-Length: 6\r\n")))
        let response = try HTTPHead.parse(Array("HTTP/1.1 200 OK\r\n\r\n".utf8)[...], as: .response)
        XCTAssertEqual(try HTTPBody.of(response: response, method: "GET"), .untilClose)
        XCTAssertEqual(try HTTPBody.of(response: response, method: "HEAD"), HTTPBody.none)
    }

    func testChunkedScannerFindsTheEndAcrossPieces() throws {
        let body = Array("5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\nNEXT".utf8)
        var scanner = ChunkedScanner()
        var used = 0
        for piece in stride(from: 0, to: body.count, by: 3) where !scanner.isDone {
            used += try scanner.feed(body[piece..<min(piece + 3, body.count)])
        }
        XCTAssertTrue(scanner.isDone)
        XCTAssertEqual(used, body.count - 4)
        var bad = ChunkedScanner()
        XCTAssertThrowsError(try bad.feed(Array("3\r\nabcd\r\n".utf8)[...]))
    }

    func testTargets() {
        XCTAssertEqual(HTTPTarget.authority("example.com:443", defaultPort: nil), .name("example.com", port: 443))
        XCTAssertEqual(HTTPTarget.authority("[::1]:22", defaultPort: nil), .address(SocketAddress(numericHost: "::1", port: 22)!))
        XCTAssertNil(HTTPTarget.authority("example.com", defaultPort: nil))
        XCTAssertNil(HTTPTarget.authority("example.com:0", defaultPort: nil))
        XCTAssertEqual(HTTPTarget.absolute("http://u:p@a.b/x?y")?.destination, .name("a.b", port: 80))
        XCTAssertEqual(HTTPTarget.absolute("http://a.b:8080?q")?.path, "/?q")
        XCTAssertNil(HTTPTarget.absolute("https://a.b/"))
    }

    func testCredentials() throws {
        let users = try ProxyCredentials(text: "# c\nalice:s3cret\n\nbob:a:b\n", source: "t")
        XCTAssertTrue(users.check(user: Array("bob".utf8), password: Array("a:b".utf8)))
        XCTAssertFalse(users.check(user: Array("alice".utf8), password: Array("s3cre".utf8)))
        XCTAssertTrue(users.check(basic: "Basic YWxpY2U6czNjcmV0"))
        XCTAssertFalse(users.check(basic: "Basic YWxpY2U6d3Jvbmc="))
        XCTAssertFalse(users.check(basic: "Bearer YWxpY2U6czNjcmV0"))
        XCTAssertThrowsError(try ProxyCredentials(text: "no colon\n", source: "t"))
        XCTAssertThrowsError(try ProxyCredentials(text: "# only a comment\n", source: "t"))
    }
}

final class ProxyPolicyTests: XCTestCase {
    private func address(_ host: String, _ port: UInt16) -> SocketAddress { SocketAddress(numericHost: host, port: port)! }

    func testRulesMatchNetworksPortsAndNames() throws {
        let net = try ProxyRule.parse("10.0.0.0/8:8000-8999")
        XCTAssertTrue(net.matches(address: address("10.200.1.1", 8080)))
        XCTAssertFalse(net.matches(address: address("10.200.1.1", 80)))
        XCTAssertFalse(net.matches(address: address("11.0.0.1", 8080)))
        XCTAssertTrue(try ProxyRule.parse("127.0.0.0/8").matches(address: address("::ffff:127.0.0.1", 1)), "IPv4-mapped counts as IPv4")
        XCTAssertTrue(try ProxyRule.parse("[fd00::/8]:443").matches(address: address("fd12::1", 443)))
        XCTAssertTrue(try ProxyRule.parse("::1").matches(address: address("::1", 22)))
        let wildcard = try ProxyRule.parse("*.Example.com:443")
        XCTAssertTrue(wildcard.matches(name: "a.b.example.com", port: 443))
        XCTAssertFalse(wildcard.matches(name: "example.com", port: 443))
        XCTAssertFalse(wildcard.matches(name: "a.example.com", port: 80))
        XCTAssertTrue(try ProxyRule.parse("*").matches(address: address("1.2.3.4", 5)))
        for bad in ["10.0.0.0/33", "a b", "host:99999", "*.", "[::1", "example.com/8", "h:5-4"] {
            XCTAssertThrowsError(try ProxyRule.parse(bad), bad)
        }
    }

    func testDenyWinsAndNamesAreCheckedAfterResolution() throws {
        let policy = ProxyPolicy(allow: [try ProxyRule.parse("*.corp"), try ProxyRule.parse("192.168.0.0/16")],
                                 deny: [try ProxyRule.parse("192.168.1.0/24"), try ProxyRule.parse("secret.corp")])
        XCTAssertEqual(policy.check(name: "Secret.corp", port: 80), .denied)
        XCTAssertEqual(policy.check(name: "www.corp", port: 80), .resolve(allowedByName: true))
        XCTAssertEqual(policy.check(name: "example.org", port: 80), .resolve(allowedByName: false))
        XCTAssertTrue(policy.admits(address("10.0.0.1", 80), allowedByName: true))
        XCTAssertFalse(policy.admits(address("192.168.1.5", 80), allowedByName: true), "deny wins after resolution")
        XCTAssertTrue(policy.admits(address("192.168.2.5", 80), allowedByName: false))
        XCTAssertFalse(policy.admits(address("10.0.0.1", 80), allowedByName: false), "with --allow, only what it names")
        let open = ProxyPolicy(deny: [try ProxyRule.parse("127.0.0.0/8")])
        XCTAssertEqual(open.check(name: "localhost", port: 80), .resolve(allowedByName: true))
        XCTAssertFalse(open.admits(address("127.0.0.1", 80), allowedByName: true))
    }

    func testUnauthenticatedPublicProxyIsAUsageError() throws {
        XCTAssertThrowsError(try ProxyFlags(listen: HostPort(host: nil, port: 1080)).check()) { error in
            XCTAssertTrue("\(error)".contains("--no-auth"))
        }
        var open = ProxyFlags(listen: HostPort(host: "0.0.0.0", port: 1080))
        open.noAuth = true
        XCTAssertNoThrow(try open.check())
        XCTAssertNoThrow(try ProxyFlags(listen: HostPort(host: "::1", port: 1080)).check())
        XCTAssertNoThrow(try ProxyFlags(listen: HostPort(host: "localhost", port: 1080)).check())
    }
}
