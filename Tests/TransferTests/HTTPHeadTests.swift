import Transfer
import XCTest

final class HTTPHeadTests: XCTestCase {
    func testFieldsKeepTheirNamesAndLookUpsIgnoreCase() throws {
        let bytes = Array("GET /x HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive, Upgrade\r\nX-Two: 1\r\nx-two: 2\r\n\r\n".utf8)
        let head = try HTTPHead.parse(bytes[...], as: .request)
        XCTAssertEqual(head.fields.map(\.name), ["Host", "Connection", "X-Two", "x-two"])
        XCTAssertEqual(head.field("x-TWO"), "1, 2")
        XCTAssertEqual(head.values("HOST"), ["a"])
        XCTAssertTrue(head.listField("connection", contains: "upgrade"))
        XCTAssertEqual(head.tokens("Connection"), ["keep-alive", "upgrade"])
        XCTAssertEqual(head.encoded(), bytes)
    }

    func testStartLinesByKind() {
        let response = Array("HTTP/1.1 101 Switching Protocols\r\n\r\n".utf8)
        XCTAssertNotNil(try? HTTPHead.parse(response[...], as: .response))
        XCTAssertNil(try? HTTPHead.parse(response[...], as: .request))
        XCTAssertNotNil(HTTPHead.parse(response[...]))
        let http2 = Array("GET http://a/ HTTP/2.0\r\n\r\n".utf8)
        XCTAssertThrowsError(try HTTPHead.parse(http2[...], as: .request)) { error in
            XCTAssertEqual((error as? HTTPHead.Malformed)?.unsupportedVersion, "HTTP/2.0")
        }
        XCTAssertNil(HTTPHead.parse(Array("hello\r\n\r\n".utf8)[...]))
    }

    func testScanResumesAndHonoursTheLimit() {
        let head = Array("GET / HTTP/1.1\r\nHost: a\r\n\r\nbody".utf8)
        XCTAssertEqual(HTTPHead.scan(Array(head.prefix(25)), limit: 100), .incomplete)
        XCTAssertEqual(HTTPHead.scan(head, from: 25, limit: 100), .complete(head.count - 4))
        XCTAssertEqual(HTTPHead.end(in: head), head.count - 4)
        XCTAssertEqual(HTTPHead.scan(Array(head.prefix(25)), limit: 20), .tooLarge)
    }
}
