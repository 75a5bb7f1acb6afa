import XCTest
@testable import Culvert

final class ReloadDiffTests: XCTestCase {
    func testDiffListsAddedRemovedAndChangedByKeyAndLeavesEqualServicesOut() {
        let diff = ServiceDiff(running: ["a": 1, "b": 2, "c": 3], new: ["a": 1, "c": 30, "d": 4])
        XCTAssertEqual(diff.added.map(\.key), ["d"])
        XCTAssertEqual(diff.added.map(\.service), [4])
        XCTAssertEqual(diff.removed.map(\.key), ["b"])
        XCTAssertEqual(diff.changed.map(\.key), ["c"])
        XCTAssertEqual(diff.changed.map(\.old), [3])
        XCTAssertEqual(diff.changed.map(\.new), [30])
        XCTAssertFalse(diff.isEmpty)
    }

    func testSameServicesMakeAnEmptyDiff() {
        XCTAssertTrue(ServiceDiff(running: ["a": 1, "b": 2], new: ["b": 2, "a": 1]).isEmpty)
        XCTAssertTrue(ServiceDiff<String, Int>(running: [:], new: [:]).isEmpty)
    }

    func testForwardFileListenersAreKeyedByListenAndFlagsOverrideEveryOne() throws {
        let scratch = try ScratchFiles()
        let path = try scratch.write("forward.toml", """
            max_connections = 7
            listen = "127.0.0.1:8000"
            targets = ["127.0.0.1:9000"]
            [services.b]
            listen = "127.0.0.1:8001"
            targets = "9001"
            max_connections = 3
            balance = "first"
            """)
        var flags = TCPForwardFlags(listen: nil, targets: [])
        let configs = try TCPForwardConfig.resolve(flags: flags, file: path).config
        XCTAssertEqual(configs.map { ForwardSet<TCPForwarder>.key($0) }, ["tcp 127.0.0.1:8000", "tcp 127.0.0.1:8001"])
        XCTAssertEqual(configs.map(\.maxConnections), [7, 3])
        XCTAssertEqual(configs.map(\.balance), [.roundRobin, .first])
        XCTAssertEqual(configs[1].targets, [HostPort(host: "127.0.0.1", port: 9001)])

        flags.maxConnections = 1
        flags.listen = HostPort(host: "127.0.0.1", port: 8500)
        flags.targets = [HostPort(host: nil, port: 9500)]
        let overridden = try TCPForwardConfig.resolve(flags: flags, file: path).config
        XCTAssertEqual(overridden.map(\.listen.port), [8500, 8001])
        XCTAssertEqual(overridden.map(\.maxConnections), [1, 1])
    }

    func testForwardFileErrorsNameFileAndKey() throws {
        let scratch = try ScratchFiles()
        let flags = TCPForwardFlags(listen: nil, targets: [])
        let cases: [(String, String, String)] = [
            ("[services.a]\nlisten = \"8000\"\n", "services.a.targets", "missing"),
            ("listen = \"8000\"\ntargets = \"9\"\n[services.a]\nlisten = \"8000\"\ntargets = \"9\"\n", "services.a.listen", "127.0.0.1:8000 is already the listen address of listen"),
            ("protocol = \"udp\"\nlisten = \"8000\"\ntargets = \"9\"\n", "protocol", "this file is for 'forward udp', not 'forward tcp'"),
            ("listen = \"8000\"\ntargets = \"9\"\nno_splice = 1\n", "no_splice", "expected true or false"),
            ("threads = 2\n", "listen", "no listener"),
        ]
        for (i, (text, key, message)) in cases.enumerated() {
            let path = try scratch.write("bad\(i).toml", text)
            XCTAssertConfigError({ () throws(ConfigError) in try TCPForwardConfig.resolve(flags: flags, file: path) },
                                 key: key, contains: "config \(path): \(key): \(message)")
        }
    }

    func testProcessSettingsAreKeptAndReportedAsNeedingRestart() {
        var running = TCPForwardConfig(listen: HostPort(host: "127.0.0.1", port: 1), targets: [HostPort(host: nil, port: 2)])
        running.threads = 2
        var new = running
        new.threads = 8
        new.drainTimeout = .seconds(1)
        XCTAssertEqual(new.keepProcessSettings(of: running), ["threads", "drain_timeout"])
        XCTAssertEqual(new, running)
    }
}
