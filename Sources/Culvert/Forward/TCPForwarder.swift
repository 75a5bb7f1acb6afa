import Logging
import Reactor
import Synchronization
import Transfer

/// `culvert forward tcp`: listens on one address (one SO_REUSEPORT socket per loop, so
/// a connection and its target connection live on the same loop and the data plane takes
/// no locks) and relays each connection to a target chosen by the balance strategy.
public final class TCPForwarder: DrainableService, MetricsSource, @unchecked Sendable {
    public let config: TCPForwardConfig
    let logger: Logger
    let targets: TargetSet
    /// The WebSocket ends (`forward ws`, a `ws://` target); nil for plain TCP.
    let webSocket: WebSocketLayers?
    /// Refused upgrades and failed WebSocket handshakes: a few lines, then one a second.
    let refusals: RefusalSummary
    /// Clients without a valid PROXY header (`--accept-proxy`): a few lines, then one a second.
    let proxyRefusals: RefusalSummary
    private let group: LoopGroup
    private var workers: [ForwardWorker] = []
    private let active = Atomic<Int>(0)
    /// The addresses actually bound (port 0 resolved), one per listen address.
    public private(set) var boundAddresses: [SocketAddress] = []

    private init(config: TCPForwardConfig, group: LoopGroup, targets: TargetSet, webSocket: WebSocketLayers?, logger: Logger) {
        self.config = config
        self.group = group
        self.targets = targets
        self.webSocket = webSocket
        self.logger = logger
        refusals = RefusalSummary(logger: logger, message: "websocket handshakes failed", loop: group.main)
        proxyRefusals = RefusalSummary(logger: logger, message: "connections refused: bad PROXY header", loop: group.main)
    }

    /// How metrics name the forwarder's one service: its listen address as given, with
    /// the port the kernel chose for port 0.
    var serviceName: String { HostPort(host: config.listen.host, port: boundAddresses.first?.port ?? config.listen.port).description }

    /// Connections accepted and not yet closed, across all loops.
    public var activeConnections: Int { active.load(ordering: .relaxed) }

    /// Resolves addresses (off-loop), binds the listeners, hands them to the loops and
    /// prints one ready line per listening address. Runs on the main loop.
    public static func start(config: TCPForwardConfig, group: LoopGroup, logger: Logger) async throws -> TCPForwarder {
        let main = group.main
        let resolvedTargets = try await resolveTargets(config.targets, on: main)
        let listenAddrs = try await Resolver.resolve(host: config.listen.host, port: config.listen.port, passive: true, on: main)
        let webSocket = config.ingress == nil && config.egress == nil ? nil
            : try WebSocketLayers(ingress: config.ingress, egress: config.egress)
        let forwarder = TCPForwarder(config: config, group: group,
                                     targets: TargetSet(targets: resolvedTargets, strategy: config.balance),
                                     webSocket: webSocket, logger: logger)
        let listeners = try LoopListeners.bind(listenAddrs, loops: group.loops.count, spec: config.listen) { (a) throws(SystemError) in
            try Net.listen(a, reusePort: true)
        }
        forwarder.boundAddresses = listeners.bound
        forwarder.workers = group.loops.map { ForwardWorker(loop: $0, forwarder: forwarder) }
        for (worker, mine) in zip(forwarder.workers, listeners.perLoop) {
            worker.loop.execute { worker.startAccepting(listeners: mine) }
        }
        let kind = config.ingress.map { $0.isSecure ? "wss" : "ws" } ?? "tcp"
        let to = config.egress.map { "\($0.url)" } ?? forwarder.targets.summary
        for address in forwarder.boundAddresses {
            ReadyLine.print("listening \(kind) \(address) -> \(to)")
        }
        return forwarder
    }

    /// Stops accepting, waits for in-flight connections to finish, and resets whatever is
    /// left when `timeout` passes. Runs on the main loop; returns once every loop is idle.
    public func drain(timeout: Duration) async {
        await Culvert.drain(workers, main: group.main, timeout: timeout, logger: logger) { [self] in activeConnections }
    }

    public func gatherMetrics() async -> MetricsSnapshot {
        var all = MetricsSnapshot.merged(await onEachLoop(workers.map(\.meters), loop: \.loop) { $0.sample() })
        all.services[serviceName]?.ports = boundAddresses.map(\.description)
        return all
    }

    // MARK: used by the workers

    /// Counts a new connection; false when the limit is reached (the caller refuses it).
    func admit() -> Bool {
        let now = active.wrappingAdd(1, ordering: .relaxed).newValue
        if config.maxConnections > 0 && now > config.maxConnections {
            active.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    func release() { active.wrappingSubtract(1, ordering: .relaxed) }

    func targetFailed(_ attempt: TargetSet.Attempt, error: SystemError, now: UInt64) {
        let wasDown = targets.isDown(attempt.target, now: now)
        let backoff = targets.markDown(attempt.target, now: now)
        let level: Logger.Level = wasDown ? .debug : .warning
        logger.log(level: level, "target unreachable", metadata: [
            "target": "\(attempt.address)", "error": "\(error)",
            "backoff": .seconds(.nanoseconds(Int64(backoff))),
        ])
    }
}
