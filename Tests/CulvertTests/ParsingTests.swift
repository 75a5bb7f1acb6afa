import XCTest
@testable import Culvert

final class HostPortTests: XCTestCase {
    func testForms() throws {
        XCTAssertEqual(try HostPort.parse("8080"), HostPort(host: "127.0.0.1", port: 8080))
        XCTAssertEqual(try HostPort.parse(":8080"), HostPort(host: nil, port: 8080))
        XCTAssertEqual(try HostPort.parse("*:0"), HostPort(host: nil, port: 0))
        XCTAssertEqual(try HostPort.parse("10.1.2.3:22"), HostPort(host: "10.1.2.3", port: 22))
        XCTAssertEqual(try HostPort.parse("[::1]:443"), HostPort(host: "::1", port: 443))
        XCTAssertEqual(try HostPort.parse("db.internal:5432"), HostPort(host: "db.internal", port: 5432))
        XCTAssertEqual(HostPort(host: "::1", port: 1).description, "[::1]:1")
        XCTAssertEqual(try HostPort.parse(":8080").asTarget, HostPort(host: "127.0.0.1", port: 8080))
        XCTAssertEqual(TCPForwardConfig(listen: HostPort(host: nil, port: 0), targets: [HostPort(host: nil, port: 9)]).targets,
                       [HostPort(host: "127.0.0.1", port: 9)], "a :PORT target means this host")
    }

    func testRejectsWithAReason() {
        let cases: [(String, String)] = [
            ("nonsense", "expected HOST:PORT"),
            ("host:70000", "out of range"),
            ("host:http", "not a number"),
            ("::1:80", "brackets"),
            ("[::1", "missing ']'"),
            ("[::1]80", "expected ':PORT'"),
            ("", "empty"),
            ("bad host:1", "not a valid host"),
        ]
        for (input, reason) in cases {
            XCTAssertThrowsError(try HostPort.parse(input), input) { error in
                XCTAssertTrue("\(error)".contains(reason), "\(input): \(error)")
            }
        }
    }
}

final class DurationSpecTests: XCTestCase {
    func testUnits() throws {
        XCTAssertEqual(try DurationSpec.parse("500ms"), .milliseconds(500))
        XCTAssertEqual(try DurationSpec.parse("5s"), .seconds(5))
        XCTAssertEqual(try DurationSpec.parse("2m"), .seconds(120))
        XCTAssertEqual(try DurationSpec.parse("1h"), .seconds(3600))
        XCTAssertEqual(try DurationSpec.parse("1.5"), .milliseconds(1500))
        XCTAssertNil(try DurationSpec.parseOptional("off"))
        XCTAssertNil(try DurationSpec.parseOptional("0"))
        XCTAssertEqual(try DurationSpec.parseOptional("30s"), .seconds(30))
        XCTAssertEqual(DurationSpec.format(.milliseconds(250)), "250ms")
        XCTAssertEqual(DurationSpec.format(.seconds(30)), "30s")
    }

    func testRejects() {
        for bad in ["abc", "-1s", "5x", "", "ms", "nan"] {
            XCTAssertThrowsError(try DurationSpec.parse(bad), bad)
        }
    }
}
