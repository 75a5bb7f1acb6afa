@testable import Culvert
import XCTest

final class AdminTests: XCTestCase {
    func testRequestHeadParsesPathAndBearerToken() {
        let head = Array("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nauthorization:  Bearer abc \r\n\r\n".utf8)
        XCTAssertEqual(AdminRequest.parse(head), .request(AdminRequest(method: "GET", path: "/metrics", authorization: "Bearer abc")))
    }

    func testRequestHeadIsIncompleteUntilTheBlankLine() {
        XCTAssertEqual(AdminRequest.parse(Array("GET / HTTP/1.1\r\nHost: a\r\n".utf8)), .incomplete)
    }

    func testRequestLineWithoutVersionIsMalformed() {
        guard case .malformed = AdminRequest.parse(Array("GET /\r\n\r\n".utf8)) else { return XCTFail("accepted") }
    }

    func testOnlyLoopbackAddressesGoWithoutToken() {
        XCTAssertTrue(AdminSettings.isLoopback(HostPort(host: "127.0.0.1", port: 9100)))
        XCTAssertTrue(AdminSettings.isLoopback(HostPort(host: "127.1.2.3", port: 9100)))
        XCTAssertTrue(AdminSettings.isLoopback(HostPort(host: "::1", port: 9100)))
        XCTAssertFalse(AdminSettings.isLoopback(HostPort(host: nil, port: 9100)))
        XCTAssertFalse(AdminSettings.isLoopback(HostPort(host: "10.0.0.1", port: 9100)))
        XCTAssertFalse(AdminSettings.isLoopback(HostPort(host: "127.example.com", port: 9100)))
        XCTAssertThrowsError(try AdminFlags(address: HostPort(host: "0.0.0.0", port: 1)).check())
        XCTAssertNoThrow(try AdminFlags(address: HostPort(host: "0.0.0.0", port: 1), tokenFile: "t").check())
    }

    func testHistogramBucketsAreCumulativeInTheText() {
        var snapshot = MetricsSnapshot()
        var h = Histogram()
        h.observe(nanoseconds: 300_000)
        h.observe(nanoseconds: 2_000_000_000)
        snapshot.connectDuration = h
        let text = PrometheusText.render(snapshot, command: "test")
        XCTAssertTrue(text.contains("culvert_connect_duration_seconds_bucket{le=\"0.0005\"} 1\n"))
        XCTAssertTrue(text.contains("culvert_connect_duration_seconds_bucket{le=\"2.5\"} 2\n"))
        XCTAssertTrue(text.contains("culvert_connect_duration_seconds_count 2\n"))
    }

    func testLabelValuesAreEscaped() {
        XCTAssertEqual(PrometheusText.escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd")
    }
}
