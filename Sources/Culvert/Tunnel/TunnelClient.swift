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

/// `culvert client`: keeps a control channel to a server (reconnecting with exponential
/// backoff and jitter, forever), registers the services, and answers each data-channel
/// request with a fresh, authenticated connection that is later paired with a visitor
/// and relayed to the local service.
///
/// With several servers (`ServerList`) it uses the first that answers and, when that one
/// is lost, the next that is not backing off, registering the same services there.
/// While a later server serves, the earlier ones are tried every `failbackInterval`
/// with a full handshake; one that answers gets a session of its own (the candidate),
/// which takes over once it holds every service: the old session then says goodbye,
/// and what runs over it (dedicated data channels, streams of its carriers) goes on
/// until it ends. The `exposed` lines are printed again whenever another server holds
/// the services.
///
/// Thread confinement: everything runs on `loop`.
public final class TunnelClient: ReloadableService, MetricsSource, @unchecked Sendable {
    /// The settings at start; a reload changes only the services.
    let config: TunnelClientConfig
    /// The services exposed now: `config.services` until a reload changes them.
    private(set) var services: [ServiceSpec]
    /// Services whose ready line is out for the server `announcedOn` (a reload adds more
    /// after the first set; a move to another server prints them all again).
    private var announced: Set<UInt32> = []
    /// The server (index) that the printed ready lines name.
    private var announcedOn: Int?
    private var nextServiceID: UInt32
    public let configPath: String?
    private let reread: (@Sendable () throws(ConfigError) -> TunnelClientConfig)?
    let loop: EventLoop
    let logger: Logger
    private var servers: ServerList
    /// One per server, by index.
    private let connectors: [TunnelConnector]
    private let control: ServiceControl
    /// The data plane, one share per loop; data channels go to them in turn.
    private let loops: [ClientLoop]
    /// Whether the ready lines are out: until then, a refused service ends the client.
    private var ready = false
    private var stopping = false
    /// The session that holds the services.
    private var current: ClientSession?
    /// A session with a server preferred to the current one, registering the services
    /// before it takes over; `candidateDeadline` gives up on it.
    private var candidate: ClientSession?
    private var candidateDeadline: LoopTimer?
    /// The session that handed its services to the current one, until it has left.
    private var previous: ClientSession?
    private var failbackTimer: LoopTimer?
    /// Sessions established after the first one.
    private var reconnects: UInt64 = 0
    private var everConnected = false
    /// The proxies through the tunnel (`-D`, `-R proxy:`).
    private let proxies: ClientProxies
    /// The `-D` addresses bound, for their ready lines.
    private var dynamicBound: [SocketAddress] = []
    /// Whether the server answered `useExit` (or no `-D` needs it): part of being ready.
    private var exitAnswered: Bool
    /// The visitor limit of each TCP and secret service, shared by the loops.
    private var visitorLimits: [UInt32: VisitorLimit]
    private let udpMaxSessions: Int

    private init(config: TunnelClientConfig, loop: EventLoop, logger: Logger, connectors: [TunnelConnector], control: ServiceControl,
                 loops: [ClientLoop], proxies: ClientProxies, visitorLimits: [UInt32: VisitorLimit], udpMaxSessions: Int,
                 configPath: String?, reread: (@Sendable () throws(ConfigError) -> TunnelClientConfig)?) {
        self.config = config
        self.visitorLimits = visitorLimits
        self.udpMaxSessions = udpMaxSessions
        self.proxies = proxies
        exitAnswered = config.dynamic.isEmpty
        services = config.services
        nextServiceID = (config.services.map(\.id).max() ?? 0) &+ 1
        self.configPath = configPath
        self.reread = reread
        self.loop = loop
        self.logger = logger
        servers = ServerList(config.endpoints, initial: config.reconnectInitial, max: config.reconnectMax)
        self.connectors = connectors
        self.control = control
        self.loops = loops
    }

    /// - Parameter reread: the command's resolution again, run on SIGHUP (with a `configPath`).
    public static func start(config: TunnelClientConfig, group: LoopGroup, logger: Logger, control: ServiceControl,
                             configPath: String? = nil,
                             reread: (@Sendable () throws(ConfigError) -> TunnelClientConfig)? = nil) async throws -> TunnelClient {
        let connectors = try config.endpoints.map { try TunnelConnector(loop: group.main, config: config.reaching($0)) }
        // Servers of a list may differ in transport: each distinct warning once.
        var warned: [String] = []
        for warning in connectors.compactMap(\.transport.warning) where !warned.contains(warning) {
            warned.append(warning)
            logger.warning("\(warning)")
        }
        let udpMaxSessions = ClientUDPRelay.sessionLimit(config: config, logger: logger)
        let refusals = RefusalSummary(logger: logger, message: "visitors refused", loop: group.main)
        let visitorLimits = VisitorLimit.make(config: config, udpMaxSessions: udpMaxSessions, logger: logger)
        let proxies = ClientProxies(config: config, logger: logger, loop: group.main, loopCount: group.loops.count)
        let loops = try group.loops.map {
            try ClientLoop(loop: $0, config: config, udpMaxSessions: udpMaxSessions, visitorLimits: visitorLimits,
                           refusals: refusals, proxies: proxies, logger: logger)
        }
        proxies.loops = loops
        let client = TunnelClient(config: config, loop: group.main, logger: logger, connectors: connectors, control: control, loops: loops,
                                  proxies: proxies, visitorLimits: visitorLimits, udpMaxSessions: udpMaxSessions,
                                  configPath: configPath, reread: reread)
        client.dynamicBound = try await proxies.startDynamic(config.dynamic, group: group)
        Task(executorPreference: group.main.tasks) { await client.run() }
        return client
    }

    // MARK: the reconnect loop

    /// Keeps a session with some server until the client stops: waits for the current
    /// one to end, and when it was lost (not handed over to a preferred server), connects
    /// to the next server.
    private func run() async {
        if servers.count > 1 { scheduleFailback() }
        while !stopping {
            guard let session = current else {
                await connectNext()
                continue
            }
            await session.waitUntilEnded()
            if let fatal = session.fatal { return giveUp(fatal) }
            guard current === session else {
                if previous === session { previous = nil }
                continue
            }
            current = nil
            servers.failed(session.server, now: loop.now)
            // A preferred server's session still registering takes over at once.
            if let next = candidate {
                dropCandidate()
                adopt(next)
                servicesExposed(by: next)
            }
        }
    }

    /// One attempt at the server `ServerList` picks, after its backoff.
    private func connectNext() async {
        let (index, wait) = servers.next(now: loop.now)
        if wait > .zero {
            logger.info("reconnecting", metadata: ["delay": .seconds(wait),
                                                   "attempt": .stringConvertible(servers[index].failures)])
            await loop.sleep(for: wait)
            if stopping { return }
        }
        do {
            guard let session = try await establish(index) else { return }
            adopt(session)
            session.start()
        } catch let fatal as FatalClientError {
            giveUp(fatal)
        } catch {
            logger.warning("cannot reach server", metadata: ["target": "\(servers[index].endpoint)", "error": "\(error)"])
            connectors[index].forgetAddresses()
            servers.failed(index, now: loop.now)
        }
    }

    /// Ends the client on a failure that retrying cannot fix.
    private func giveUp(_ fatal: FatalClientError) {
        guard !stopping else { return }
        stopping = true
        logger.critical("\(fatal.message)")
        FatalOutput.write(fatal.message)
        control.exit(status: 1)
    }

    /// A control session with server `index`: connection, transport handshake and
    /// authentication; started (registering the services) unless the client began to
    /// stop meanwhile (then nil).
    private func establish(_ index: Int) async throws -> ClientSession? {
        let connector = connectors[index]
        let channel = try await connector.openChannel()
        // With multiplexing, pooled dedicated channels serve only secret services' visitors.
        let pool = config.mux > 0 && !services.contains(where: { $0.kind == .secret }) ? 0 : config.pool
        let auth = try await connector.authenticate(channel, poolSize: pool, muxChannels: config.mux, heartbeat: config.heartbeat)
        // A drain that began while this session was being set up ends it here.
        guard !stopping else {
            channel.close()
            return nil
        }
        var about: Logger.Metadata = ["target": "\(servers[index].endpoint)"]
        if let webSocket = connector.webSocket { about["inner"] = "\(webSocket.innerLayer(of: channel.duplex))" }
        logger.info("connected to server", metadata: about)
        if everConnected { reconnects += 1 }
        everConnected = true
        let credentials = SessionCredentials(id: auth.id, key: auth.key, server: index)
        return ClientSession(client: self, control: channel, credentials: credentials, loops: loops)
    }

    /// `session` holds the services from now on; the `-D` proxies follow its server's
    /// answer to `useExit` when it came while the session was a candidate.
    private func adopt(_ session: ClientSession) {
        current = session
        servers.served(session.server)
        session.credentials.startServing()
        if let answer = session.exitAnswer { proxies.exitAnswered(answer) }
    }

    // MARK: moving back to a preferred server

    private func scheduleFailback() {
        failbackTimer = loop.schedule(after: config.failbackInterval) { [weak self] in
            guard let self else { return }
            Task(executorPreference: self.loop.tasks) {
                await self.tryPreferred()
                if !self.stopping { self.scheduleFailback() }
            }
        }
    }

    /// While a later server serves, tries the earlier ones in order; the first that
    /// answers gets a candidate session.
    private func tryPreferred() async {
        guard ready, let serving = current, candidate == nil else { return }
        for index in 0..<serving.server {
            let session: ClientSession?
            do {
                session = try await establish(index)
            } catch let fatal as FatalClientError {
                return giveUp(fatal)
            } catch {
                logger.debug("preferred server still unreachable", metadata: ["target": "\(servers[index].endpoint)", "error": "\(error)"])
                connectors[index].forgetAddresses()
                continue
            }
            guard let session else { return }
            // The serving session may have been lost or replaced meanwhile: the reconnect
            // loop has that in hand.
            guard let still = current, still.server > index else {
                return session.leave(reason: "not needed: another session serves")
            }
            candidate = session
            candidateDeadline = loop.schedule(after: config.handshakeTimeout) { [weak self, weak session] in
                guard let self, let session, self.candidate === session else { return }
                self.logger.warning("preferred server did not accept every service; staying", metadata: [
                    "target": "\(self.servers[session.server].endpoint)"])
                self.dropCandidate()
                session.leave(reason: "not every service was accepted")
            }
            session.start()
            Task(executorPreference: loop.tasks) { [weak self] in
                await session.waitUntilEnded()
                if self?.candidate === session { self?.dropCandidate() }
            }
            return
        }
    }

    private func dropCandidate() {
        candidate = nil
        candidateDeadline?.cancel()
        candidateDeadline = nil
    }

    // MARK: ready lines

    /// Logs a service the server `server` (index) accepted; returns its ready line and
    /// the address it shows (nil for a secret service).
    func serviceExposed(_ spec: ServiceSpec, address: String, server: Int) -> (line: String, address: String?) {
        if spec.kind == .proxy {
            let shown = publicAddress(address, server: server)
            logger.info("reverse proxy exposed", metadata: ["listen": "\(shown)"])
            return ("exposed proxy \(shown)", shown)
        }
        if spec.kind == .secret {
            logger.info("secret service registered", metadata: ["service": "\(spec.name)", "target": "\(spec.localDescription)"])
            return ("exposed secret \(spec.name) -> \(spec.localDescription)", nil)
        }
        let shown = publicAddress(address, server: server)
        logger.info("service exposed", metadata: ["listen": "\(shown)", "target": "\(spec.localDescription)"])
        return ("exposed \(spec.kindName) \(shown) -> \(spec.localDescription)", shown)
    }

    /// Where visitors reach a service the server `server` (index) bound at `address`: a
    /// wildcard shows as that server's host.
    private func publicAddress(_ address: String, server: Int) -> String {
        guard let bound = try? HostPort.parse(address), let host = bound.host, host == "0.0.0.0" || host == "::" else { return address }
        return HostPort(host: servers[server].endpoint.address.host, port: bound.port).description
    }

    /// The server answered `useExit`: the `-D` proxies serve accordingly, and the ready
    /// lines may be complete. A candidate's answer waits until it takes over (`adopt`):
    /// until then the serving server is the exit, whatever the preferred one allows.
    func exitAnswered(_ answer: ClientProxies.ExitAnswer, by session: ClientSession) {
        guard session === current else { return servicesExposed(by: session) }
        proxies.exitAnswered(answer)
        exitAnswered = true
        servicesExposed(by: session)
    }

    /// The server closed the session instead of answering `useExit`: it predates exits.
    /// Before the ready lines that ends the client; after them it is logged, and the
    /// session is tried again.
    func exitUnsupported(_ error: Error) -> FatalClientError? {
        let message = "the server closed the session when asked to be the exit of -D (\(error)): "
            + "it predates exits through the tunnel; upgrade the server, or drop -D"
        if !ready { return FatalClientError(message: message) }
        logger.error("\(message)")
        return nil
    }

    /// A session's accepted services so far. For the current session: once every
    /// current service is among them, the ready lines, in the order the services were
    /// given, the first time only (a script that reads them can rely on every service
    /// being reachable); after that, a service a reload added gets its line when the
    /// server accepts it, and when another server holds the services (after a loss),
    /// each line is printed again as that server accepts the service. A candidate takes
    /// over once it holds every service, and then prints them all.
    func servicesExposed(by session: ClientSession) {
        let lines = session.readyLines
        if session === candidate {
            guard services.allSatisfy({ lines[$0.id] != nil }) else { return }
            takeOver(session)
            return
        }
        guard session === current else { return }
        if ready {
            if announcedOn != session.server { announce(on: session.server) }
            for spec in services where !announced.contains(spec.id) {
                guard let line = lines[spec.id] else { continue }
                announced.insert(spec.id)
                ReadyLine.print(line)
            }
            return
        }
        guard exitAnswered, services.allSatisfy({ lines[$0.id] != nil }) else { return }
        ready = true
        announce(on: session.server)
        for spec in services {
            announced.insert(spec.id)
            ReadyLine.print(lines[spec.id]!)
        }
        for address in dynamicBound { ReadyLine.print("listening proxy \(address)") }
    }

    /// The candidate holds every service: it serves from now on and prints the ready
    /// lines; then the old session is handed over, so that a script has the new
    /// addresses before the old ones close (its running relays go on).
    private func takeOver(_ session: ClientSession) {
        dropCandidate()
        previous = current
        adopt(session)
        servicesExposed(by: session)
        previous?.handOver(to: servers[session.server].endpoint)
    }

    /// The ready lines from now on name server `index`.
    private func announce(on index: Int) {
        announcedOn = index
        announced = []
        logger.info("services held by server", metadata: ["server": "\(servers[index].endpoint)"])
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
    /// id. A `-R proxy:` the running client cannot serve (`canServeReverseProxy`) is
    /// left as it runs and reported as `reverse_proxy` needing a restart. The other
    /// settings need a restart and are kept.
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
        let running = plain(services)
        var wanted = plain(new.services)
        for (name, spec) in wanted where spec.kind == .proxy && running[name] != spec && !canServeReverseProxy(spec) {
            wanted[name] = running[name]
            if !report.needsRestart.contains("reverse_proxy") { report.needsRestart.append("reverse_proxy") }
        }
        let diff = ServiceDiff(running: running, new: wanted)
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
        visitorLimits = VisitorLimit.updated(visitorLimits, for: specs, config: config, udpMaxSessions: udpMaxSessions, logger: logger)
        let limits = visitorLimits
        for l in loops { l.run { l.servicesChanged(specs, limits: limits) } }
        current?.servicesChanged(removed: removed, added: added)
        candidate?.servicesChanged(removed: removed, added: added)
        return report
    }

    /// Whether a `-R proxy:` added by a reload can be served now. Its visitors are served
    /// by the proxy context made at start, under the running credentials: a client that
    /// started without a reverse proxy has no context (its visitors would be closed
    /// unanswered), and running auth settings that leave the new bind open (validated
    /// against the re-read file's, which need a restart) would expose an open proxy.
    private func canServeReverseProxy(_ spec: ServiceSpec) -> Bool {
        proxies.reverse != nil && (config.proxyCredentials != nil || config.proxyNoAuth || ProxyConfig.isLoopback(spec.bindHost))
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
            ("server", a.endpoints == b.endpoints), ("failback_interval", a.failbackInterval == b.failbackInterval), ("token", a.token == b.token), ("transport", a.transport == b.transport),
            ("ca", a.caFile == b.caFile), ("fingerprint", a.fingerprint == b.fingerprint), ("pool", a.pool == b.pool),
            ("mux", a.mux == b.mux), ("heartbeat_interval", a.heartbeat.interval == b.heartbeat.interval),
            ("heartbeat_misses", a.heartbeat.misses == b.heartbeat.misses), ("handshake_timeout", a.handshakeTimeout == b.handshakeTimeout),
            ("connect_timeout", a.connectTimeout == b.connectTimeout), ("reconnect_max", a.reconnectMax == b.reconnectMax),
            ("drain_timeout", a.drainTimeout == b.drainTimeout), ("threads", a.threads == b.threads),
            ("udp_idle_timeout", a.udpIdleTimeout == b.udpIdleTimeout), ("udp_max_sessions", a.udpMaxSessions == b.udpMaxSessions),
            ("headers", a.webSocket.headers.elementsEqual(b.webSocket.headers, by: { $0.name == $1.name && $0.value == $1.value })),
            ("host_header", a.webSocket.hostHeader == b.webSocket.hostHeader), ("sni", a.webSocket.serverName == b.webSocket.serverName),
            ("inner", a.webSocket.inner == b.webSocket.inner), ("ws_ping", a.webSocket.ping == b.webSocket.ping),
            ("proxy", a.proxy == b.proxy), ("ws_path", a.webSocket.path == b.webSocket.path),
            ("dynamic", a.dynamic == b.dynamic), ("exit_allow", a.exitAllow == b.exitAllow), ("exit_deny", a.exitDeny == b.exitDeny),
            ("proxy_auth_file", a.proxyAuthFile == b.proxyAuthFile), ("no_auth", a.proxyNoAuth == b.proxyNoAuth),
            ("max_visitors", a.maxVisitors == b.maxVisitors),
        ]
        return checks.filter { !$0.1 }.map(\.0)
    }

    public func gatherMetrics() async -> MetricsSnapshot {
        var all = MetricsSnapshot.merged(await onEachLoop(loops, loop: \.loop) { $0.meters.sample() })
        let exposedAt = current?.exposedAt ?? [:]
        for spec in services {
            all.services[spec.name, default: ServiceSample(kind: spec.kindName)].ports = exposedAt[spec.name].map { [$0] } ?? []
        }
        all.tunnelSessions = current == nil ? 0 : 1
        all.tunnelReconnects = reconnects
        all.tunnelServer = current.map { servers[$0.server].endpoint.description }
        return all
    }

    public func drain(timeout: Duration) async {
        stopping = true
        await proxies.drainDynamic(timeout: timeout, main: loop)
        failbackTimer?.cancel()
        failbackTimer = nil
        let sessions = [current, candidate, previous].compactMap { $0 }
        dropCandidate()
        for session in sessions { session.leave(reason: "stopped") }
        for session in sessions { await session.waitUntilEnded() }
        let running = await onEachLoop(loops, loop: \.loop) { $0.relayCount }.reduce(0, +)
        if running == 0 { return }
        logger.notice("draining", metadata: ["connections": .stringConvertible(running)])
        _ = await onEachLoop(loops, loop: \.loop) {
            $0.proxyIdleClients.drain()
            await $0.relays.drain(timeout: timeout)
        }
    }
}

/// Messages for the user that must reach stderr even with JSON logs.
enum FatalOutput {
    static func write(_ message: String) {
        writeLine("culvert: \(message)", to: 2)
    }
}
