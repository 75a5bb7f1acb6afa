import Logging
import Reactor
import Synchronization
import Transfer

/// `culvert forward udp`: datagrams from each client address form a session with its own
/// connected upstream socket, so replies go back to the right client and an ICMP error
/// from the target ends that session alone.
public final class UDPForwarder: DrainableService, MetricsSource, @unchecked Sendable {
    public let config: UDPForwardConfig
    let logger: Logger
    let targets: TargetSet
    private let group: LoopGroup
    private var workers: [UDPWorker] = []
    private let sessions = Atomic<Int>(0)
    public private(set) var boundAddresses: [SocketAddress] = []

    /// The session limit in force (0: none): `config.maxSessions` or the default.
    let maxSessions: Int

    private init(config: UDPForwardConfig, group: LoopGroup, targets: TargetSet, maxSessions: Int, logger: Logger) {
        self.config = config
        self.group = group
        self.targets = targets
        self.maxSessions = maxSessions
        self.logger = logger
    }

    public var activeSessions: Int { sessions.load(ordering: .relaxed) }

    /// How metrics name the forwarder's one service: its listen address as given, with
    /// the port the kernel chose for port 0.
    var serviceName: String { HostPort(host: config.listen.host, port: boundAddresses.first?.port ?? config.listen.port).description }

    public func gatherMetrics() async -> MetricsSnapshot {
        var all = MetricsSnapshot.merged(await onEachLoop(workers, loop: \.loop) { $0.sample() })
        all.services[serviceName]?.ports = boundAddresses.map(\.description)
        return all
    }

    public static func start(config: UDPForwardConfig, group: LoopGroup, logger: Logger) async throws -> UDPForwarder {
        let main = group.main
        let resolvedTargets = try await resolveTargets(config.targets, on: main)
        let listenAddrs = try await Resolver.resolve(host: config.listen.host, port: config.listen.port, passive: true, on: main)
        let listeners = try LoopListeners.bind(listenAddrs, loops: group.loops.count, spec: config.listen) { (a) throws(SystemError) in
            try Net.udpListen(a, reusePort: true, bufferSize: config.socketBuffer)
        }
        // Counted once the listeners hold theirs: what is left is what sessions can take.
        let free = UDPSessionBudget.freeDescriptors()
        let maxSessions = config.maxSessions ?? UDPSessionBudget.defaultLimit(freeDescriptors: free)
        logSessionLimit(maxSessions, configured: config.maxSessions != nil, freeDescriptors: free, logger: logger)
        let forwarder = UDPForwarder(config: config, group: group,
                                     targets: TargetSet(targets: resolvedTargets, strategy: config.balance),
                                     maxSessions: maxSessions, logger: logger)
        forwarder.boundAddresses = listeners.bound
        forwarder.workers = group.loops.map { UDPWorker(loop: $0, forwarder: forwarder) }
        for (worker, mine) in zip(forwarder.workers, listeners.perLoop) {
            worker.loop.execute { worker.start(listeners: mine) }
        }
        for address in listeners.bound {
            ReadyLine.print("listening udp \(address) -> \(forwarder.targets.summary)")
        }
        return forwarder
    }

    /// One line that states the limit, and a warning when a flood would meet EMFILE
    /// before the limit: new clients are then still dropped and counted, not logged one
    /// by one, but the limit is not what stops them.
    private static func logSessionLimit(_ maxSessions: Int, configured: Bool, freeDescriptors free: Int, logger: Logger) {
        let metadata: Logger.Metadata = [
            "max_sessions": .stringConvertible(maxSessions), "free_descriptors": .stringConvertible(free),
            "from": configured ? "--max-sessions" : "default",
        ]
        logger.info("session limit", metadata: metadata)
        if maxSessions == 0 || maxSessions > free {
            logger.warning("session limit exceeds free descriptors", metadata: metadata)
        }
    }

    /// UDP has nothing in flight to wait for: stop receiving and close every session.
    public func drain(timeout: Duration) async {
        let main = group.main
        logger.notice("closing sessions", metadata: ["sessions": .stringConvertible(activeSessions)])
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            let barrier = Barrier(count: workers.count) { done.resume() }
            for w in workers {
                w.loop.execute {
                    w.stop()
                    main.execute { barrier.arrive() }
                }
            }
        }
    }

    func admitSession() -> Bool {
        let now = sessions.wrappingAdd(1, ordering: .relaxed).newValue
        if maxSessions > 0 && now > maxSessions {
            sessions.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    func releaseSession() { sessions.wrappingSubtract(1, ordering: .relaxed) }
}
