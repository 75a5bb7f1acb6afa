#if canImport(Glibc)
import Glibc
#endif
import Logging
import Reactor
import Transfer

/// A failure that retrying cannot fix: the process exits 1 with this message.
struct FatalClientError: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}

/// `culvert client`: keeps a control channel to the server (reconnecting with
/// exponential backoff and jitter, forever), registers the services, and answers each
/// data-channel request with a fresh, authenticated connection that is later paired
/// with a visitor and relayed to the local service.
///
/// Thread confinement: everything runs on `loop`.
public final class TunnelClient: ReloadableService, MetricsSource, @unchecked Sendable {
    /// The settings at start; a reload changes only the services.
    let config: TunnelClientConfig
    /// The services exposed now: `config.services` until a reload changes them.
    private(set) var services: [ServiceSpec]
    /// Services whose ready line is out (a reload adds more after the first set).
    private var announced: Set<UInt32> = []
    private var nextServiceID: UInt32
    public let configPath: String?
    private let reread: (@Sendable () throws(ConfigError) -> TunnelClientConfig)?
    let loop: EventLoop
    let logger: Logger
    private let connector: TunnelConnector
    private let control: ServiceControl
    /// The data plane, one share per loop; data channels go to them in turn.
    private let loops: [ClientLoop]
    /// Whether the ready lines are out: until then, a refused service ends the client.
    private var ready = false
    private var stopping = false
    private var current: ClientSession?
    /// Sessions established after the first one.
    private var reconnects: UInt64 = 0
    private var everConnected = false
    /// Where the server exposed each service, by name, as its ready line says.
    private var exposedAt: [String: String] = [:]

    private init(config: TunnelClientConfig, loop: EventLoop, logger: Logger, connector: TunnelConnector, control: ServiceControl,
                 loops: [ClientLoop], configPath: String?, reread: (@Sendable () throws(ConfigError) -> TunnelClientConfig)?) {
        self.config = config
        services = config.services
        nextServiceID = (config.services.map(\.id).max() ?? 0) &+ 1
        self.configPath = configPath
        self.reread = reread
        self.loop = loop
        self.logger = logger
        self.connector = connector
        self.control = control
        self.loops = loops
    }

    /// - Parameter reread: the command's resolution again, run on SIGHUP (with a `configPath`).
    public static func start(config: TunnelClientConfig, group: LoopGroup, logger: Logger, control: ServiceControl,
                             configPath: String? = nil,
                             reread: (@Sendable () throws(ConfigError) -> TunnelClientConfig)? = nil) async throws -> TunnelClient {
        let connector = try TunnelConnector(loop: group.main, config: config)
        if let warning = connector.transport.warning {
            logger.warning("\(warning)")
        }
        let udpMaxSessions = ClientUDPRelay.sessionLimit(config: config, logger: logger)
        let refusals = RefusalSummary(logger: logger, message: "visitors refused", loop: group.main)
        let visitorLimits = VisitorLimit.make(config: config, udpMaxSessions: udpMaxSessions, logger: logger)
        let loops = try group.loops.map {
            try ClientLoop(loop: $0, config: config, udpMaxSessions: udpMaxSessions, visitorLimits: visitorLimits,
                           refusals: refusals, logger: logger)
        }
        let client = TunnelClient(config: config, loop: group.main, logger: logger, connector: connector, control: control, loops: loops,
                                  configPath: configPath, reread: reread)
        Task(executorPreference: group.main.tasks) { await client.run() }
        return client
    }

    // MARK: the reconnect loop

    private func run() async {
        var failures = 0
        while !stopping {
            do {
                let established = try await runSession()
                if established { failures = 0 }
            } catch let fatal as FatalClientError {
                logger.critical("\(fatal.message)")
                FatalOutput.write(fatal.message)
                control.exit(status: 1)
                return
            } catch {
                logger.warning("cannot reach server", metadata: ["target": "\(config.server)", "error": "\(error)"])
                connector.forgetAddresses()
            }
            if stopping { return }
            failures += 1
            let base = config.reconnectInitial.nanoseconds << UInt64(min(failures - 1, 20))
            let capped = min(base, config.reconnectMax.nanoseconds)
            let delay = Duration.nanoseconds(Int64(Double(capped) * Double.random(in: 0.5...1.0)))
            logger.info("reconnecting", metadata: ["delay": .seconds(delay), "attempt": .stringConvertible(failures)])
            await loop.sleep(for: delay)
        }
    }

    /// One control session: handshake, service registration, then serving requests until
    /// the channel dies. Returns whether the session got as far as authentication.
    private func runSession() async throws -> Bool {
        let channel = try await connector.openChannel()
        // With multiplexing, pooled dedicated channels serve only secret services' visitors.
        let pool = config.mux > 0 && !services.contains(where: { $0.kind == .secret }) ? 0 : config.pool
        let auth = try await connector.authenticate(channel, poolSize: pool, muxChannels: config.mux, heartbeat: config.heartbeat)
        // A drain that began while this session was being set up ends it here.
        guard !stopping else {
            channel.close()
            return true
        }
        logger.info("connected to server", metadata: ["target": "\(config.server)"])
        let session = ClientSession(client: self, control: channel, credentials: SessionCredentials(id: auth.id, key: auth.key),
                                    loops: loops)
        current = session
        if everConnected { reconnects += 1 }
        everConnected = true
        defer { current = nil }
        try await session.run()
        return true
    }

    /// Logs a service the server accepted; returns its ready line.
    func serviceExposed(_ spec: ServiceSpec, address: String) -> String {
        if spec.kind == .secret {
            logger.info("secret service registered", metadata: ["service": "\(spec.name)", "target": "\(spec.localDescription)"])
            return "exposed secret \(spec.name) -> \(spec.localDescription)"
        }
        var shown = address
        if let bound = try? HostPort.parse(address), let host = bound.host, host == "0.0.0.0" || host == "::" {
            shown = HostPort(host: config.server.host, port: bound.port).description
        }
        exposedAt[spec.name] = shown
        logger.info("service exposed", metadata: ["listen": "\(shown)", "target": "\(spec.localDescription)"])
        return "exposed \(spec.kindName) \(shown) -> \(spec.localDescription)"
    }

    /// A session's accepted services so far: once every current service is among them,
    /// the ready lines, in the order the services were given, the first time only (a
    /// script that reads them can rely on every service being reachable); after that, a
    /// service a reload added gets its line when the server accepts it.
    func servicesExposed(_ lines: [UInt32: String]) {
        if ready {
            for spec in services where !announced.contains(spec.id) {
                guard let line = lines[spec.id] else { continue }
                announced.insert(spec.id)
                ReadyLine.print(line)
            }
            return
        }
        guard services.allSatisfy({ lines[$0.id] != nil }) else { return }
        ready = true
        for spec in services {
            announced.insert(spec.id)
            ReadyLine.print(lines[spec.id]!)
        }
    }

    /// What a refused service means: before the ready lines, the error that ends the
    /// process (like ssh's ExitOnForwardFailure); after them, a logged error (the session
    /// registers it again later).
    func serviceRefused(_ spec: ServiceSpec, reason: String) -> FatalClientError? {
        let message = "server refused service \(spec.name): \(reason)"
        if !ready { return FatalClientError(message: message) }
        logger.error("\(message)")
        return nil
    }

    /// The service of that id, while it is exposed.
    func service(_ id: UInt32) -> ServiceSpec? {
        services.first { $0.id == id }
    }

    // MARK: reload

    /// Applies the re-read file's services by name: added ones are registered on the
    /// live session (their ready lines follow the server's answer), removed ones are
    /// unregistered (their running visitors go on), changed ones are both, under a new
    /// id. The other settings need a restart and are kept.
    public func reload() async throws -> ReloadReport {
        guard let reread else { return ReloadReport() }
        let new = try reread()
        var report = ReloadReport()
        report.needsRestart = Self.restartOnly(config, new)
        let plain = { (specs: [ServiceSpec]) in
            Dictionary(specs.map { spec in
                var s = spec
                s.id = 0
                return (spec.name, s)
            }, uniquingKeysWith: { first, _ in first })
        }
        let diff = ServiceDiff(running: plain(services), new: plain(new.services))
        if diff.isEmpty { return report }
        let byName = Dictionary(services.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        var removed: [ServiceSpec] = []
        var added: [ServiceSpec] = []
        for (name, _) in diff.removed {
            removed.append(byName[name]!)
            report.removed.append(ConfigCheck.describe(byName[name]!))
        }
        for (name, _, spec) in diff.changed {
            removed.append(byName[name]!)
            added.append(withNewID(spec))
            report.replaced.append(ConfigCheck.describe(spec))
        }
        for (_, spec) in diff.added {
            added.append(withNewID(spec))
            report.added.append(ConfigCheck.describe(spec))
        }
        let gone = Set(removed.map(\.id))
        services = services.filter { !gone.contains($0.id) } + added
        let specs = services
        for l in loops { l.run { l.servicesChanged(specs) } }
        current?.servicesChanged(removed: removed, added: added)
        return report
    }

    private func withNewID(_ spec: ServiceSpec) -> ServiceSpec {
        var s = spec
        s.id = nextServiceID
        nextServiceID &+= 1
        return s
    }

    /// The settings other than the services that differ: a live client cannot change them.
    private static func restartOnly(_ a: TunnelClientConfig, _ b: TunnelClientConfig) -> [String] {
        let checks: [(String, Bool)] = [
            ("server", a.server == b.server), ("token", a.token == b.token), ("transport", a.transport == b.transport),
            ("ca", a.caFile == b.caFile), ("fingerprint", a.fingerprint == b.fingerprint), ("pool", a.pool == b.pool),
            ("mux", a.mux == b.mux), ("heartbeat_interval", a.heartbeat.interval == b.heartbeat.interval),
            ("heartbeat_misses", a.heartbeat.misses == b.heartbeat.misses), ("handshake_timeout", a.handshakeTimeout == b.handshakeTimeout),
            ("connect_timeout", a.connectTimeout == b.connectTimeout), ("reconnect_max", a.reconnectMax == b.reconnectMax),
            ("drain_timeout", a.drainTimeout == b.drainTimeout), ("threads", a.threads == b.threads),
            ("udp_idle_timeout", a.udpIdleTimeout == b.udpIdleTimeout), ("udp_max_sessions", a.udpMaxSessions == b.udpMaxSessions),
        ]
        return checks.filter { !$0.1 }.map(\.0)
    }

    public func gatherMetrics() async -> MetricsSnapshot {
        var all = MetricsSnapshot.merged(await onEachLoop(loops, loop: \.loop) { $0.meters.sample() })
        for spec in config.services {
            all.services[spec.name, default: ServiceSample(kind: spec.kindName)].ports = exposedAt[spec.name].map { [$0] } ?? []
        }
        all.tunnelSessions = current == nil ? 0 : 1
        all.tunnelReconnects = reconnects
        return all
    }

    public func drain(timeout: Duration) async {
        stopping = true
        if let session = current {
            session.leave(reason: "stopped")
            await session.waitUntilEnded()
        }
        let running = await onEachLoop(loops, loop: \.loop) { $0.relayCount }.reduce(0, +)
        if running == 0 { return }
        logger.notice("draining", metadata: ["connections": .stringConvertible(running)])
        _ = await onEachLoop(loops, loop: \.loop) { await $0.relays.drain(timeout: timeout) }
    }
}

/// Messages for the user that must reach stderr even with JSON logs.
enum FatalOutput {
    static func write(_ message: String) {
        writeLine("culvert: \(message)", to: 2)
    }
}
