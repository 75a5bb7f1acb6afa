import XCTest
@testable import Transfer

/// A close frame's reason must be UTF-8 (RFC 6455 section 5.5.1; Autobahn case 7.5.1).
final class WebSocketCloseReasonTests: XCTestCase {
    func testACloseReasonThatIsNotUTF8IsAProtocolError() {
        XCTAssertEqual(WebSocketFrame.parseClose([0x03, 0xE8] + Array("bye, ça va".utf8)), .code(1000))
        XCTAssertEqual(WebSocketFrame.parseClose([0x03, 0xE8, 0xCE, 0xBA, 0xE1, 0xBD]), .invalid, "a truncated sequence")
        XCTAssertEqual(WebSocketFrame.parseClose([0x03, 0xE8, 0xFF]), .invalid)
        XCTAssertEqual(WebSocketFrame.parseClose([0x03, 0xE8]), .code(1000))
    }
}
