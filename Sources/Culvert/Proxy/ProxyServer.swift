import Logging
import Reactor
import Transfer

/// `culvert proxy`: SOCKS5 and HTTP proxy on one port (one SO_REUSEPORT socket per loop,
/// like the forwarders), connecting out through a `LocalExit`.
public final class ProxyServer: DrainableService, MetricsSource, @unchecked Sendable {
    private let context: ProxyContext
    private let group: LoopGroup
    private var workers: [ProxyWorker] = []
    /// Each loop's counters, the proxy's connections under `serviceName`.
    private var meters: [LoopMeters] = []
    /// The addresses actually bound (port 0 resolved).
    public private(set) var boundAddresses: [SocketAddress] = []

    private init(context: ProxyContext, group: LoopGroup) {
        self.context = context
        self.group = group
    }

    /// Binds the listeners, hands them to the loops and prints one ready line per
    /// address. Runs on the main loop.
    public static func start(config: ProxyConfig, group: LoopGroup, logger: Logger) async throws -> ProxyServer {
        let main = group.main
        let listenAddrs = try await Resolver.resolve(host: config.listen.host, port: config.listen.port, passive: true, on: main)
        let listeners = try LoopListeners.bind(listenAddrs, loops: group.loops.count, spec: config.listen) { (a) throws(SystemError) in
            try Net.listen(a, reusePort: true)
        }
        // A proxied connection holds two sockets, and two pipe ends while it splices.
        let maxConnections = config.maxConnections ?? max(1, UDPSessionBudget.freeDescriptors() / 4)
        let resolver = CachingResolver()
        let exit = LocalExit(policy: config.policy, resolver: resolver, connectTimeout: config.connectTimeout)
        // An association holds its relay socket and up to udpSocketsPerAssociation more;
        // together they get a quarter of the free descriptors, as connections do.
        let maxAssociations = config.maxAssociations
            ?? max(1, min(UDPSessionBudget.ceiling, UDPSessionBudget.freeDescriptors() / 4 / (1 + config.udpSocketsPerAssociation)))
        let batches = DatagramBatches(loops: group.loops.count)
        let udp = ProxyUDP(exit: LocalDatagramExit(policy: config.policy, resolver: resolver, maxSockets: config.udpSocketsPerAssociation, batches: batches),
                           batches: batches, idleTimeout: config.udpIdleTimeout, maxAssociations: maxAssociations)
        let context = ProxyContext(config: config, exit: exit, logger: logger,
                                   refusals: RefusalSummary(logger: logger, message: "proxy requests refused", loop: main),
                                   maxConnections: maxConnections, udp: udp)
        let server = ProxyServer(context: context, group: group)
        server.boundAddresses = listeners.bound
        let name = server.serviceName
        server.meters = group.loops.map { LoopMeters(loop: $0) }
        server.workers = server.meters.map { ProxyWorker(loop: $0.loop, context: context, meter: $0.service(name, kind: "tcp")) }
        for (worker, mine) in zip(server.workers, listeners.perLoop) {
            worker.loop.execute { worker.startAccepting(listeners: mine) }
        }
        logger.info("proxy started", metadata: [
            "auth": "\(config.credentials.map { "\($0.count) users" } ?? "none")",
            "max_connections": .stringConvertible(maxConnections),
            "max_udp_associations": .stringConvertible(maxAssociations),
        ])
        for address in server.boundAddresses { ReadyLine.print("listening proxy \(address)") }
        return server
    }

    /// The listen address with its bound port: the name the proxy's metrics carry.
    var serviceName: String {
        HostPort(host: context.config.listen.host, port: boundAddresses.first?.port ?? context.config.listen.port).description
    }

    public func gatherMetrics() async -> MetricsSnapshot {
        var all = MetricsSnapshot.merged(await onEachLoop(meters, loop: \.loop) { $0.sample() })
        all.services[serviceName]?.ports = boundAddresses.map(\.description)
        return all
    }

    /// Client connections open now, across all loops.
    public var activeConnections: Int { context.activeConnections }

    /// Stops accepting, lets connections finish, and resets what is left at `timeout`.
    public func drain(timeout: Duration) async {
        await Culvert.drain(workers, main: group.main, timeout: timeout, logger: context.logger) { [self] in activeConnections }
    }
}
