import Foundation
import Logging
import XCTest
@testable import Culvert

/// Durations in log lines: JSON numbers of seconds for machines, the way settings are
/// written (`30s`, `1.5s`, `250ms`) or measured (`0.012s`) for people.
final class LoggedSecondsTests: XCTestCase {
    private func line(_ format: LogFormat, _ metadata: Logger.Metadata) -> String {
        let event = LogEvent(level: .notice, message: "draining", metadata: metadata, source: nil,
                             file: #fileID, function: #function, line: #line)
        return StderrLogHandler(level: .trace, format: format).line(for: event)
    }

    func testJSONWritesEverySettingAsANumberOfSeconds() throws {
        let json = line(.json, ["deadline": .seconds(.seconds(30)), "backoff": .seconds(.milliseconds(1500)),
                                "interval": .seconds(.milliseconds(250))])
        XCTAssertTrue(json.contains(#""deadline":30,"#), json)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        XCTAssertEqual(object["deadline"] as? Double, 30)
        XCTAssertEqual(object["backoff"] as? Double, 1.5)
        XCTAssertEqual(object["interval"] as? Double, 0.25)
    }

    func testTextWritesSettingsAsTheyAreGiven() {
        let text = line(.text, ["deadline": .seconds(.seconds(30)), "interval": .seconds(.milliseconds(250))])
        XCTAssertEqual(text, "notice draining deadline=30s interval=250ms")
    }

    func testMeasuredDurationsKeepTheirMilliseconds() throws {
        let measured = LoggedSeconds(nanoseconds: 12_345_678)
        XCTAssertEqual(measured.description, "0.012s")
        let json = line(.json, ["duration": .stringConvertible(measured)])
        XCTAssertTrue(json.contains(#""duration":0.012}"#), json)
    }
}
