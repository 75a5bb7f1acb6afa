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
public final class TunnelClient: DrainableService, MetricsSource, @unchecked Sendable {
    let config: TunnelClientConfig
    let loop: EventLoop
    let logger: Logger
    private let connector: TunnelConnector
    private let control: ServiceControl
    /// The data plane, one share per loop; data channels go to them in turn.
    private let loops: [ClientLoop]
    private var everConnected = false
    private var announced: Set<UInt32> = []
    private var stopping = false
    private var current: ClientSession?
    /// Sessions established after the first one.
    private var reconnects: UInt64 = 0
    /// Where the server exposed each service, by name, as its ready line says.
    private var exposedAt: [String: String] = [:]

    private init(config: TunnelClientConfig, loop: EventLoop, logger: Logger, connector: TunnelConnector, control: ServiceControl,
                 loops: [ClientLoop]) {
        self.config = config
        self.loop = loop
        self.logger = logger
        self.connector = connector
        self.control = control
        self.loops = loops
    }

    public static func start(config: TunnelClientConfig, group: LoopGroup, logger: Logger, control: ServiceControl) async throws -> TunnelClient {
        let connector = try TunnelConnector(loop: group.main, config: config)
        if let warning = connector.transport.warning {
            logger.warning("\(warning)")
        }
        let udpMaxSessions = ClientUDPRelay.sessionLimit(config: config, logger: logger)
        let loops = try group.loops.map { try ClientLoop(loop: $0, config: config, udpMaxSessions: udpMaxSessions, logger: logger) }
        let client = TunnelClient(config: config, loop: group.main, logger: logger, connector: connector, control: control, loops: loops)
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
            logger.info("reconnecting", metadata: ["delay": "\(DurationSpec.format(delay))", "attempt": .stringConvertible(failures)])
            await loop.sleep(for: delay)
        }
    }

    /// One control session: handshake, service registration, then serving requests until
    /// the channel dies. Returns whether the session got as far as authentication.
    private func runSession() async throws -> Bool {
        let channel = try await connector.openChannel()
        // With multiplexing, pooled dedicated channels serve only secret services' visitors.
        let pool = config.mux > 0 && !config.services.contains(where: { $0.kind == .secret }) ? 0 : config.pool
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
        let firstSession = !everConnected
        if !firstSession { reconnects += 1 }
        everConnected = true
        defer { current = nil }
        try await session.run(firstSession: firstSession)
        return true
    }

    /// Prints the ready line the first time a service becomes reachable.
    func serviceExposed(_ spec: ServiceSpec, address: String) {
        let id = spec.id
        if spec.kind == .secret {
            logger.info("secret service registered", metadata: ["service": "\(spec.name)", "target": "\(spec.localDescription)"])
            if announced.insert(id).inserted { ReadyLine.print("exposed secret \(spec.name) -> \(spec.localDescription)") }
            return
        }
        var shown = address
        if let bound = try? HostPort.parse(address), let host = bound.host, host == "0.0.0.0" || host == "::" {
            shown = HostPort(host: config.server.host, port: bound.port).description
        }
        exposedAt[spec.name] = shown
        logger.info("service exposed", metadata: ["listen": "\(shown)", "target": "\(spec.localDescription)"])
        if announced.insert(id).inserted {
            ReadyLine.print("exposed \(spec.kindName) \(shown) -> \(spec.localDescription)")
        }
    }

    /// A refusal at first start ends the process (like ssh's ExitOnForwardFailure).
    func serviceRefused(_ spec: ServiceSpec, reason: String, firstSession: Bool) throws {
        let message = "server refused service \(spec.name): \(reason)"
        if firstSession { throw FatalClientError(message: message) }
        logger.error("\(message)")
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
        current?.end()
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
