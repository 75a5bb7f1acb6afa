import Foundation
import Logging
import XCTest
@testable import Culvert

/// Log lines stay one line each and never carry a raw control character, whatever text a
/// peer puts into a message or a value.
final class LogOutputTests: XCTestCase {
    /// One of each control class: C0 with a short form, C0 without (NUL, ESC), DEL, and C1
    /// (NEL, which some tools take for a newline, and CSI).
    private let hostile = "a\nb\rc\td\u{0}e\u{1b}[31mf\u{7f}g\u{85}h\u{9b}2Ji"
    private let escaped = #"a\nb\rc\td\u0000e\u001b[31mf\u007fg\u0085h\u009b2Ji"#

    private func line(_ format: LogFormat, _ message: String, _ metadata: Logger.Metadata) -> String {
        let handler = StderrLogHandler(level: .trace, format: format)
        let event = LogEvent(level: .warning, message: "\(message)", metadata: metadata, source: nil,
                             file: #fileID, function: #function, line: #line)
        return handler.line(for: event)
    }

    private func assertNoRawControl(_ line: String, file: StaticString = #filePath, lineNumber: UInt = #line) {
        let raw = line.unicodeScalars.filter { $0.value < 0x20 || (0x7f...0x9f).contains($0.value) }
        XCTAssertTrue(raw.isEmpty, "raw control characters \(raw.map(\.value)) in \(line.debugDescription)", file: file, line: lineNumber)
    }

    func testTextValuesWithControlCharactersAreQuotedAndEscaped() {
        let text = line(.text, "visit refused", ["service": "\(hostile)"])
        XCTAssertEqual(text, "warning visit refused service=\"\(escaped)\"")
        assertNoRawControl(text)
    }

    func testTextMessagesKeepTheirSpacesButNotTheirControlCharacters() {
        let text = line(.text, "refused: \(hostile) \"quoted\"", [:])
        XCTAssertEqual(text, "warning refused: \(escaped) \"quoted\"")
        assertNoRawControl(text)
    }

    func testPlainValuesStayAsTheyWereAndABackslashIsQuoted() {
        XCTAssertEqual(line(.text, "m", ["peer": "127.0.0.1:5000", "service": "home-ssh"]),
                       "warning m peer=127.0.0.1:5000 service=home-ssh")
        XCTAssertEqual(line(.text, "m", ["reason": "heartbeat (3 missed) timed out"]),
                       "warning m reason=\"heartbeat (3 missed) timed out\"")
        XCTAssertEqual(line(.text, "m", ["service": #"a\nb"#]), #"warning m service="a\\nb""#,
                       "an unquoted value is always literal, so a backslash forces quotes")
        XCTAssertEqual(line(.text, "m", ["service": "ünïcödé"]), "warning m service=ünïcödé")
    }

    func testJSONEscapesEveryControlCharacterAndRoundTrips() throws {
        let json = line(.json, "refused: \(hostile)", ["service": "\(hostile)", "\(hostile)": "key"])
        assertNoRawControl(json)
        XCTAssertTrue(json.contains(#""service":"\#(escaped)""#), json)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        XCTAssertEqual(object["msg"] as? String, "refused: \(hostile)")
        XCTAssertEqual(object["service"] as? String, hostile)
        XCTAssertEqual(object[hostile] as? String, "key")
    }
}
