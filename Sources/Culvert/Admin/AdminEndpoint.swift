import Logging
import Reactor
import Transfer

/// The admin endpoint (`--admin ADDR`): a small HTTP/1.1 responder on its own listener
/// serving `GET /metrics` (Prometheus text), `GET /status` (JSON) and `GET /healthz`.
/// One request per connection, then close. Everything is bounded: the request head
/// (8 KiB), the time to send it and read the answer (5 s), and connections open at once
/// (16, beyond which new ones are reset and summarised); scraping never blocks a loop,
/// as counters are gathered through each loop's inbox.
///
/// Thread confinement: everything runs on `loop` (the main loop), requests as tasks on it.
public final class AdminEndpoint: @unchecked Sendable {
    static let maxRequestBytes = 8 * 1024
    static let maxConnections = 16
    static let deadline: Duration = .seconds(5)

    let loop: EventLoop
    private let settings: AdminSettings
    private let source: MetricsSource?
    private let logger: Logger
    private let listeners: Listeners
    private let refusals: RefusalSummary
    private var open = 0

    private init(settings: AdminSettings, loop: EventLoop, source: MetricsSource?, logger: Logger) {
        self.settings = settings
        self.loop = loop
        self.source = source
        self.logger = logger
        listeners = Listeners(loop: loop, logger: logger)
        refusals = RefusalSummary(logger: logger, message: "admin connections refused", loop: loop)
    }

    /// Binds and watches the admin address and prints `listening admin ADDR` per bound
    /// address. `source` is the running command (nil: one without counters of its own).
    public static func start(settings: AdminSettings, loop: EventLoop, source: MetricsSource?, logger: Logger) async throws -> AdminEndpoint {
        loop.assertInLoop()
        let bound = try await Listeners.bind(settings.address, on: loop, reusePort: false)
        let endpoint = AdminEndpoint(settings: settings, loop: loop, source: source, logger: logger)
        try endpoint.listeners.start(bound) { [unowned endpoint] fd, _ in endpoint.accepted(fd) }
        for (_, address) in bound { ReadyLine.print("listening admin \(address)") }
        return endpoint
    }

    /// Stops accepting; requests being served finish.
    public func stop() {
        loop.assertInLoop()
        listeners.stop()
    }

    private func accepted(_ fd: Int32) {
        guard open < Self.maxConnections else {
            Net.closeWithReset(fd)
            if refusals.record("limit") {
                logger.warning("admin connection refused: limit reached", metadata: ["max": .stringConvertible(Self.maxConnections)])
            }
            return
        }
        open += 1
        Task(executorPreference: loop.tasks) {
            await self.serve(fd)
            self.open -= 1
        }
    }

    private func serve(_ fd: Int32) async {
        let channel: AsyncDuplex
        do {
            channel = try AsyncDuplex(loop: loop, duplex: TCPStream(fd: fd), sendLimit: 4 << 20)
        } catch {
            Posix.close(fd)
            return
        }
        let timer = loop.schedule(after: Self.deadline) { channel.fail(.timedOut("admin request")) }
        defer { timer.cancel() }
        let response: AdminResponse
        switch await readHead(channel) {
        case .incomplete: return channel.close()
        case .malformed(let why): response = .text(400, why)
        case .request(let request): response = await answer(request)
        }
        channel.send(response.bytes)
        try? await channel.flush()
        channel.close()
    }

    /// Reads until the head is complete, too large, or the peer or the deadline ends it.
    private func readHead(_ channel: AsyncDuplex) async -> AdminRequest.Head {
        var bytes: [UInt8] = []
        while true {
            do {
                bytes += try await channel.read(max: Self.maxRequestBytes + 1 - bytes.count)
            } catch {
                return .incomplete
            }
            let head = AdminRequest.parse(bytes)
            if head != .incomplete { return head }
            if bytes.count > Self.maxRequestBytes { return .malformed("request head larger than \(Self.maxRequestBytes) bytes") }
        }
    }

    private func answer(_ request: AdminRequest) async -> AdminResponse {
        if let token = settings.token {
            let given = Array((request.authorization ?? "").utf8)
            let expected = Array("Bearer \(token)".utf8)
            guard given.count == expected.count, TunnelCrypto.constantTimeEqual(given, expected) else {
                return .text(401, "missing or wrong bearer token", headers: [("WWW-Authenticate", "Bearer realm=\"culvert\"")])
            }
        }
        guard ["/metrics", "/status", "/healthz"].contains(request.path) else { return .text(404, "not found") }
        guard request.method == "GET" else { return .text(405, "only GET is served", headers: [("Allow", "GET")]) }
        switch request.path {
        case "/healthz":
            return .text(200, "ok")
        case "/metrics":
            let snapshot = await gather()
            return AdminResponse(status: 200, contentType: PrometheusText.contentType,
                                 body: PrometheusText.render(snapshot, command: settings.command))
        default:
            let snapshot = await gather()
            return AdminResponse(status: 200, contentType: "application/json",
                                 body: StatusReport.render(snapshot, command: settings.command) + "\n")
        }
    }

    private func gather() async -> MetricsSnapshot {
        await source?.gatherMetrics() ?? MetricsSnapshot()
    }
}
