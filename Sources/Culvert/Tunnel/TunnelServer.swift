import Logging
import Reactor
import Synchronization
import Transfer

/// `culvert server`: accepts tunnel clients, authenticates them, exposes their services
/// on public ports and pairs each visitor with a data channel from its client.
///
/// The work spreads over every loop of the group: each loop accepts on its own
/// SO_REUSEPORT socket of the tunnel port (`ServerLoop`), a client's session lives on
/// the loop that accepted its control channel, and its carriers and dedicated data
/// channels are placed on several loops, each visitor relayed on the loop of the channel
/// it rides. Loops hand each other work only through their inboxes.
///
/// Thread confinement: `start` and `drain` run on the main loop.
public final class TunnelServer: ReloadableService, MetricsSource, @unchecked Sendable {
    private let context: ServerContext
    /// The tunnel listener's addresses (port 0 resolved), one per listen address.
    public let boundAddresses: [SocketAddress]
    public let configPath: String?
    private let reread: (@Sendable () throws(ConfigError) -> TunnelServerConfig)?

    private init(context: ServerContext, boundAddresses: [SocketAddress], configPath: String?,
                 reread: (@Sendable () throws(ConfigError) -> TunnelServerConfig)?) {
        self.context = context
        self.boundAddresses = boundAddresses
        self.configPath = configPath
        self.reread = reread
    }

    /// - Parameter reread: the command's resolution again, run on SIGHUP (with a `configPath`).
    public static func start(config: TunnelServerConfig, group: LoopGroup, logger: Logger, configPath: String? = nil,
                             reread: (@Sendable () throws(ConfigError) -> TunnelServerConfig)? = nil) async throws -> TunnelServer {
        let keys = TokenKeys(token: config.token)
        let transport = try config.transport.implementation.init(server: config, keys: keys)
        var bound: [SocketAddress] = []
        var perLoop: [[LoopListeners.Listener]] = Array(repeating: [], count: group.loops.count)
        do {
            for spec in config.listen {
                let addresses = try await Resolver.resolve(host: spec.host, port: spec.port, passive: true, on: group.main)
                let listeners = try LoopListeners.bind(addresses, loops: group.loops.count, spec: spec) { (a) throws(SystemError) in
                    try Net.listen(a, reusePort: true)
                }
                bound += listeners.bound
                for (i, mine) in listeners.perLoop.enumerated() { perLoop[i] += mine }
            }
        } catch {
            for listeners in perLoop { for l in listeners { Posix.close(l.fd) } }
            throw error
        }
        let context = ServerContext(config: config, logger: logger, keys: keys, transport: transport, loops: group.loops)
        for (serverLoop, mine) in zip(context.loops, perLoop) {
            serverLoop.loop.execute { serverLoop.startAccepting(mine) }
        }
        for address in bound {
            ReadyLine.print("listening tunnel \(address)")
        }
        if let warning = transport.warning {
            logger.warning("\(warning)")
        }
        return TunnelServer(context: context, boundAddresses: bound, configPath: configPath, reread: reread)
    }

    /// Applies what a live server can change: the port policy (allow_ports, bind_addr)
    /// and the limits max_clients and max_services, for registrations and sessions from
    /// now on (services and sessions already there stay). The rest needs a restart.
    public func reload() async throws -> ReloadReport {
        guard let reread else { return ReloadReport() }
        let new = try reread()
        let old = context.config
        let live = context.reloadable
        var report = ReloadReport()
        let applied: [(String, Bool)] = [
            ("allow_ports", live.policy.config.allowPorts != new.allowPorts),
            ("bind_addr", live.policy.config.bindAddresses != new.bindAddresses),
            ("max_services", live.maxServicesPerClient != new.maxServicesPerClient),
            ("max_clients", live.maxClients != new.maxClients),
        ]
        report.applied = applied.filter(\.1).map(\.0)
        let restartOnly: [(String, Bool)] = [
            ("listen", old.listen != new.listen), ("token", old.token != new.token), ("transport", old.transport != new.transport),
            ("cert", old.certFile != new.certFile), ("key", old.keyFile != new.keyFile),
            ("max_unauthenticated", old.maxUnauthenticated != new.maxUnauthenticated),
            ("max_unauthenticated_per_source", old.maxUnauthenticatedPerSource != new.maxUnauthenticatedPerSource),
            ("handshake_timeout", old.handshakeTimeout != new.handshakeTimeout),
            ("heartbeat_interval", old.heartbeat.interval != new.heartbeat.interval),
            ("heartbeat_misses", old.heartbeat.misses != new.heartbeat.misses),
            ("drain_timeout", old.drainTimeout != new.drainTimeout), ("threads", old.threads != new.threads),
            ("allow_exit", old.allowExit != new.allowExit), ("exit_allow", old.exitAllow != new.exitAllow),
            ("exit_deny", old.exitDeny != new.exitDeny), ("ws_path", old.webSocket.path != new.webSocket.path),
            ("inner", old.webSocket.inner != new.webSocket.inner), ("ws_ping", old.webSocket.ping != new.webSocket.ping),
        ]
        report.needsRestart = restartOnly.filter(\.1).map(\.0)
        context.apply(ServerContext.Reloadable(new))
        return report
    }

    public func gatherMetrics() async -> MetricsSnapshot {
        MetricsSnapshot.merged(await context.onEachLoop { $0.sample() })
    }

    /// Stops accepting clients and visitors, lets running relays finish (resetting what
    /// is left after `timeout`), then ends every session.
    public func drain(timeout: Duration) async {
        context.draining.store(true, ordering: .relaxed)
        let relays = await context.onEachLoop { $0.stopAccepting() }
        context.logger.notice("draining", metadata: [
            "connections": .stringConvertible(relays.reduce(0, +)), "clients": .stringConvertible(context.directory.count),
        ])
        _ = await context.onEachLoop { await $0.relays.drain(timeout: timeout) }
        _ = await context.onEachLoop { await $0.endSessions() }
    }
}

/// What every loop of one tunnel server shares: settings fixed at start, the session
/// directory and a few counters, all safe from any thread; and the loops themselves,
/// which other loops only hand work to through `ServerLoop.run`.
final class ServerContext: @unchecked Sendable {
    let config: TunnelServerConfig
    let logger: Logger
    let keys: TokenKeys
    let transport: any Transport
    let directory: SessionDirectory
    let loops: [ServerLoop]
    /// Connections accepted and not authenticated yet, on every loop
    /// (`--max-unauthenticated`, `--max-unauthenticated-per-source`).
    let unauthenticated: UnauthenticatedBudget
    /// Refused and failed unauthenticated connections, and connections the tunnel port or
    /// a service's port could not accept: anyone can cause them by the thousand, so past
    /// the first few they are counted, one line per second.
    let refusals: RefusalSummary
    /// Visitors of exposed services dropped because no data channel came in time: a
    /// client that cannot keep up with a flood of visitors would log one line each.
    let visitorDrops: RefusalSummary
    /// The exit for clients' `-D` streams (refusing them without `--allow-exit`).
    let exit: ServerExit
    let draining = Atomic<Bool>(false)
    private let serviceSerial = Atomic<UInt64>(0)

    /// The settings a reload changes on a live server; read once per registration.
    struct Reloadable: Sendable {
        var policy: PortPolicy
        var maxServicesPerClient: Int
        var maxClients: Int

        init(_ config: TunnelServerConfig) {
            policy = PortPolicy(config: config)
            maxServicesPerClient = config.maxServicesPerClient
            maxClients = config.maxClients
        }
    }

    private let live: Mutex<Reloadable>
    var reloadable: Reloadable { live.withLock { $0 } }

    func apply(_ settings: Reloadable) {
        live.withLock { $0 = settings }
        directory.setMaxSessions(settings.maxClients)
    }

    init(config: TunnelServerConfig, logger: Logger, keys: TokenKeys, transport: any Transport, loops: [EventLoop]) {
        self.config = config
        self.logger = logger
        self.keys = keys
        self.transport = transport
        live = Mutex(Reloadable(config))
        directory = SessionDirectory(maxSessions: config.maxClients)
        unauthenticated = UnauthenticatedBudget(max: config.maxUnauthenticated, perSource: config.maxUnauthenticatedPerSource)
        refusals = RefusalSummary(logger: logger, message: "unauthenticated connections refused", loop: loops[0])
        visitorDrops = RefusalSummary(logger: logger, message: "visitors dropped", loop: loops[0])
        exit = ServerExit(config: config, logger: logger, loop: loops[0], loopCount: loops.count)
        self.loops = loops.enumerated().map { [refusals] in ServerLoop(loop: $1, index: $0, logger: logger, refusals: refusals) }
        for l in self.loops { l.context = self }
    }

    /// A number no other service of this server has: it names the service's relay sets.
    func nextServiceKey() -> UInt64 {
        serviceSerial.wrappingAdd(1, ordering: .relaxed).newValue
    }

    /// The loop after `loop`, `step` places on: how a session spreads its channels.
    func loop(after loop: ServerLoop, step: Int) -> ServerLoop {
        loops[(loop.index + step) % loops.count]
    }

    /// Runs `body` on every loop (as a task on its executor) and returns the results.
    func onEachLoop<T: Sendable>(_ body: @escaping @Sendable (ServerLoop) async -> T) async -> [T] {
        await Culvert.onEachLoop(loops, loop: \.loop, body)
    }
}
