import Logging
import Reactor
import Synchronization
import Transfer

/// The identity a data channel proves to the server: its session's id and key, and
/// which of the client's servers (by index) the session is with. `isEnded` is set (on
/// the session's loop) before the loops hear of the end, so a channel still on its way
/// for an ended session is closed instead of pooled. `isServing` is set once the session
/// holds the services (a candidate's is not yet): `-D` exit streams prefer its carriers.
final class SessionCredentials: Sendable {
    let id: [UInt8]
    let key: [UInt8]
    let server: Int
    private let ended = Atomic<Bool>(false)
    private let serving = Atomic<Bool>(false)

    init(id: [UInt8], key: [UInt8], server: Int) {
        self.id = id
        self.key = key
        self.server = server
    }

    var isEnded: Bool { ended.load(ordering: .relaxed) }
    func end() { ended.store(true, ordering: .relaxed) }
    var isServing: Bool { serving.load(ordering: .relaxed) }
    func startServing() { serving.store(true, ordering: .relaxed) }
}

/// One loop's share of a tunnel client's data plane: the data channels the session
/// asked it to open, the carriers among them, the connections to local services and
/// the relays, one relay set per service. The control session hands each data-channel
/// request to the next loop in turn, so one busy client uses every core.
///
/// Channels, carriers and UDP relays are kept with the session they belong to: while
/// the client moves back to a preferred server, two sessions overlap, and the end of the
/// old one must leave the new one's alone. Relays are per service, not per session:
/// a visitor relayed over an ended session's data channel or draining carrier goes on.
///
/// Thread confinement: everything but `loop` and `run` is touched on `loop` only.
final class ClientLoop: @unchecked Sendable {
    let loop: EventLoop
    private let config: TunnelClientConfig
    private let logger: Logger
    /// One per server of the client, by index (`SessionCredentials.server`).
    private let connectors: [TunnelConnector]
    let relays: RelayGroup
    let meters: LoopMeters
    /// The services by id; a reload replaces them (`servicesChanged`).
    private var services: [UInt32: ServiceSpec]
    /// This loop's relay set of each service.
    private var serviceRelays: [UInt32: RelaySet] = [:]
    /// Local service addresses resolved so far, by service id.
    private var resolvedLocal: [UInt32: [SocketAddress]] = [:]
    /// Data channels opened and waiting for the server's command.
    private var pooled: [ObjectIdentifier: (channel: AsyncDuplex, session: SessionCredentials)] = [:]
    /// Data channels carrying multiplexed TCP visitors.
    private var carriers: [ObjectIdentifier: (carrier: MuxConnection, session: SessionCredentials)] = [:]
    /// Local connections being made for multiplexed visitors, with their carrier's session.
    private var connecting: [ObjectIdentifier: (connector: Connector, session: SessionCredentials)] = [:]
    /// Data channels carrying UDP services.
    private var udpRelays: [ObjectIdentifier: (relay: ClientUDPRelay, session: SessionCredentials)] = [:]
    /// Data channels that failed since the last summary line, by session, and the timer
    /// that writes it.
    private var channelFailures: [ObjectIdentifier: (session: SessionCredentials, count: Int, reason: String)] = [:]
    private var failureReport: LoopTimer?
    /// How often at most this loop writes a summary of failed data channels.
    private static let reportInterval: Duration = .seconds(1)
    /// The session cap of each UDP service (`ClientUDPRelay.sessionLimit`).
    private let udpMaxSessions: Int
    /// Secret-service visitors turned away: anyone with the server's token can send them
    /// by the thousand, so past the first few they are counted (shared by every loop).
    private let refusals: RefusalSummary
    /// The visitor limit of each TCP and secret service, shared by every loop; a reload
    /// adds those of the services it adds (`servicesChanged`).
    private var visitorLimits: [UInt32: VisitorLimit]
    /// Visitors refused at their service's limit since the last summary line, by
    /// service id, and the timer that writes it.
    private var refusedAtLimit: [UInt32: Int] = [:]
    private var refusalReport: LoopTimer?
    /// The proxies through the tunnel (`-D`, `-R proxy:`), shared by every loop.
    private let proxies: ClientProxies
    /// `-R proxy:` visitors idle between HTTP requests, ended when a drain begins.
    let proxyIdleClients = IdleClients()
    /// This loop's `-D` sockets, once watched.
    var dynamicListeners: Listeners?
    /// The sessions with carriers up on this loop, and how many each: read by other
    /// loops placing `-D` connections, which need a carrier of the serving session.
    private let carrierSessions = Mutex<[ObjectIdentifier: (session: SessionCredentials, count: Int)]>([:])

    /// Whether a `-D` exit stream can open here: a carrier of a session that serves and
    /// is not leaving is up. A candidate's carriers do not count (its server's answer to
    /// `useExit` is not the one in force), nor a leaving session's, which hold on to
    /// their carriers until the goodbye is answered.
    var hasExitCarrier: Bool {
        carrierSessions.withLock { $0.values.contains { $0.session.isServing && !$0.session.isEnded } }
    }

    private func countCarrier(of session: SessionCredentials, _ delta: Int) {
        carrierSessions.withLock { sessions in
            let key = ObjectIdentifier(session)
            let count = (sessions[key]?.count ?? 0) + delta
            sessions[key] = count > 0 ? (session, count) : nil
        }
    }

    init(loop: EventLoop, config: TunnelClientConfig, udpMaxSessions: Int, visitorLimits: [UInt32: VisitorLimit],
         refusals: RefusalSummary, proxies: ClientProxies, logger: Logger) throws {
        self.loop = loop
        self.proxies = proxies
        self.config = config
        self.udpMaxSessions = udpMaxSessions
        self.visitorLimits = visitorLimits
        self.refusals = refusals
        self.logger = logger
        connectors = try config.endpoints.map { try TunnelConnector(loop: loop, config: config.reaching($0)) }
        relays = RelayGroup(loop: loop, logger: logger)
        meters = LoopMeters(loop: loop)
        services = Dictionary(config.services.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
    }

    /// Runs `body` on this loop: at once when already there, else through its inbox.
    func run(_ body: @escaping @Sendable () -> Void) {
        if loop.inEventLoop { body() } else { loop.execute(body) }
    }

    /// Relays running on this loop.
    var relayCount: Int { relays.count }

    /// A reload changed the services: visitors of the removed ones are refused from now
    /// on, while their running relays go on and leave the group when done; the added
    /// ones come with their visitor limits.
    func servicesChanged(_ current: [ServiceSpec], limits: [UInt32: VisitorLimit]) {
        loop.assertInLoop()
        services = Dictionary(current.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
        visitorLimits = limits
        for id in Array(serviceRelays.keys) where services[id] == nil {
            relays.retire(serviceRelays.removeValue(forKey: id)!)
            resolvedLocal[id] = nil
        }
    }

    // MARK: data channels

    /// Opens one data channel for the server's nonce, waits in the pool until the server
    /// says what it carries, then serves it: a carrier, a UDP service, or one visitor
    /// relayed to its local service.
    func openDataChannel(nonce: [UInt8], session: SessionCredentials) async {
        loop.assertInLoop()
        let channel: AsyncDuplex
        do {
            channel = try await openChannel(for: session)
        } catch {
            return channelFailed(session, reason: "\(error)")
        }
        guard !session.isEnded else { return channel.close() }
        let key = ObjectIdentifier(channel)
        pooled[key] = (channel, session)
        defer { pooled[key] = nil }
        let serviceID: UInt32
        let visitor: String
        do {
            channel.send(TunnelProtocol.encode(.dataHello(
                version: TunnelProtocol.version, sessionID: session.id, channelNonce: nonce,
                proof: TunnelProtocol.dataProof(sessionKey: session.key, sessionID: session.id, channelNonce: nonce))))
            switch try await TunnelProtocol.read(TunnelProtocol.DataCommand.self, from: channel) {
            case .connect(let sid, let who):
                serviceID = sid
                visitor = who
            case .mux:
                return startCarrier(channel.detach(), session: session)
            }
        } catch {
            // .closed: this end closed it (the session ended). .eof: the server closed it
            // cleanly, a pooled channel it had no use for; a refused or lost one is reset.
            switch error as? ChannelError {
            case .closed?:
                break
            case .eof?:
                logger.debug("pooled data channel closed by the server")
            default:
                channelFailed(session, reason: "before the server's command: \(error)")
            }
            channel.fail(.closed)
            return
        }
        guard let spec = services[serviceID] else {
            return channel.fail(.protocolViolation("unknown service \(serviceID)"))
        }
        switch spec.kind {
        case .proxy:
            serveProxyVisitor(channel.detach(), spec: spec, visitor: visitor)
        case .udp:
            await startUDPRelay(channel, spec: spec, session: session)
        case .tcp:
            await serveVisitor(channel, spec: spec, visitor: visitor)
        case .secret:
            // The visitor must prove the service token before anything local is touched.
            do {
                let key = TunnelProtocol.secretKey(serviceToken: spec.serviceToken ?? config.token, name: spec.name)
                try await challengeVisitor(channel, spec: spec, key: key)
            } catch {
                if refusals.record("visitor_refused") {
                    logger.warning("visitor refused", metadata: ["peer": "\(visitor)", "service": "\(spec.name)", "error": "\(error)"])
                }
                return
            }
            await serveVisitor(channel, spec: spec, visitor: visitor)
        }
    }

    /// A connection for a data channel, ready for its hello. One that fails before the
    /// hello goes out (refused, reset, or cut in the transport handshake) cannot have
    /// used the server's nonce, so it is tried once more after a moment: a connection
    /// lost on the way then costs the visitor that moment instead of the server's request
    /// deadline, which by default is as long as a visitor waits.
    private func openChannel(for session: SessionCredentials) async throws -> AsyncDuplex {
        let connector = connectors[session.server]
        do {
            return try await connector.openChannel()
        } catch {
            await loop.sleep(for: Self.retryPause)
            guard !session.isEnded else { throw error }
            return try await connector.openChannel()
        }
    }

    /// The pause before the one retry of a data channel that failed before its hello.
    private static let retryPause: Duration = .milliseconds(100)

    /// Counts a data channel that could not be opened or was lost before the server said
    /// what it carries (refused by a limit, expired, cut on the way). The server asks
    /// again; a flood of them is one line per interval. Failures of a session that ended
    /// meanwhile are not reported: the server closed its pooled channels on purpose.
    private func channelFailed(_ session: SessionCredentials, reason: String) {
        let key = ObjectIdentifier(session)
        channelFailures[key] = (session, (channelFailures[key]?.count ?? 0) + 1, reason)
        guard failureReport == nil else { return }
        failureReport = loop.schedule(after: Self.reportInterval) { [weak self] in self?.reportFailures() }
    }

    private func reportFailures() {
        failureReport = nil
        for (session, count, reason) in channelFailures.values where !session.isEnded {
            logger.warning("cannot open data channel", metadata: ["error": "\(reason)", "count": .stringConvertible(count)])
        }
        channelFailures.removeAll()
    }

    /// Connects a dedicated channel's visitor to its local service and relays. At the
    /// service's visitor limit the channel is closed, which closes the visitor.
    private func serveVisitor(_ channel: AsyncDuplex, spec: ServiceSpec, visitor: String) async {
        guard admit(spec) else { return channel.fail(.closed) }
        let localFD: Int32
        let dialStarted = loop.now
        do {
            localFD = try await Connector.connect(to: try await localAddresses(of: spec), timeout: config.connectTimeout, on: loop)
            meters.observeConnect(since: dialStarted)
        } catch {
            visitorLimits[spec.id]?.release()
            meter(of: spec).count(result: "connect-failed")
            logger.warning("local service unreachable", metadata: ["peer": "\(visitor)", "target": "\(spec.localDescription)", "error": "\(error)"])
            if spec.kind == .secret {
                channel.send(TunnelProtocol.encode(TunnelProtocol.VisitAnswer.refused(.init(.localUnreachable, "local service unreachable"))))
                try? await channel.flush()
            }
            return channel.fail(.closed)
        }
        guard sendProxyHeader(spec, visitor: visitor, to: localFD) else {
            visitorLimits[spec.id]?.release()
            Posix.close(localFD)
            return channel.fail(.closed)
        }
        if spec.kind == .secret {
            channel.send(TunnelProtocol.encode(.serviceReady))
            do {
                try await channel.flush()
            } catch {
                visitorLimits[spec.id]?.release()
                Posix.close(localFD)
                return channel.fail(.closed)
            }
        }
        // The session may have ended while this connect was under way: its end closed
        // the channel, whose descriptor must not be used again.
        guard channel.isOpen, let data = wrap(channel.detach(), compress: spec.compress) else {
            visitorLimits[spec.id]?.release()
            return Posix.close(localFD)
        }
        startRelay(data, localFD: localFD, visitor: visitor, spec: spec)
    }

    /// Takes a place under the service's visitor limit; a refusal is counted for the
    /// summary line.
    private func admit(_ spec: ServiceSpec) -> Bool {
        guard let limit = visitorLimits[spec.id], !limit.admit() else { return true }
        refusedAtLimit[spec.id, default: 0] += 1
        if refusalReport == nil {
            refusalReport = loop.schedule(after: Self.reportInterval) { [weak self] in self?.reportRefusals() }
        }
        return false
    }

    private func reportRefusals() {
        refusalReport = nil
        for (id, count) in refusedAtLimit {
            guard let spec = services[id], let limit = visitorLimits[id] else { continue }
            logger.warning("visitors refused: service at its limit", metadata: [
                "service": "\(spec.name)", "count": .stringConvertible(count), "max": .stringConvertible(limit.max),
            ])
        }
        refusedAtLimit.removeAll()
    }

    /// The exposer's half of the end-to-end service-token proof. On a wrong proof the
    /// visitor is told so and the channel closed.
    private func challengeVisitor(_ channel: AsyncDuplex, spec: ServiceSpec, key: [UInt8]) async throws {
        let timer = loop.schedule(after: config.handshakeTimeout) { channel.fail(.timedOut("visitor handshake")) }
        defer { timer.cancel() }
        do {
            guard case .serviceHello(let visitorNonce) = try await TunnelProtocol.read(TunnelProtocol.VisitorFrame.self, from: channel) else {
                throw ChannelError.protocolViolation("expected the visitor's hello")
            }
            let exposerNonce = TunnelCrypto.random(TunnelProtocol.nonceSize)
            channel.send(TunnelProtocol.encode(.serviceChallenge(
                exposerNonce: exposerNonce,
                exposerProof: TunnelProtocol.exposerProof(key: key, name: spec.name, visitorNonce: visitorNonce, exposerNonce: exposerNonce))))
            guard case .serviceProof(let proof) = try await TunnelProtocol.read(TunnelProtocol.VisitorFrame.self, from: channel) else {
                throw ChannelError.protocolViolation("expected the visitor's proof")
            }
            let expected = TunnelProtocol.visitorProof(key: key, name: spec.name, visitorNonce: visitorNonce, exposerNonce: exposerNonce)
            guard TunnelCrypto.constantTimeEqual(proof, expected) else {
                channel.send(TunnelProtocol.encode(TunnelProtocol.VisitAnswer.refused(.init(.wrongServiceToken, "wrong service token"))))
                try? await channel.flush()
                throw ChannelError.protocolViolation("wrong service token")
            }
        } catch {
            channel.fail(.closed)
            throw error
        }
    }

    // MARK: multiplexed data channels

    private func startCarrier(_ stream: Duplex, session: SessionCredentials) {
        guard !session.isEnded else { return stream.close(reset: false) }
        let carrier = MuxConnection(loop: loop, carrier: stream, isOpener: false, pipes: relays.resources.pipes)
        carrier.onOpen = { [weak self, weak carrier] stream, payload in
            guard let self, let carrier else { return stream.close(reset: true) }
            self.streamOpened(stream, payload, on: carrier, session: session)
        }
        var started = false
        carrier.onClose = { [weak self] carrier, error in
            guard let self else { return }
            if self.carriers.removeValue(forKey: ObjectIdentifier(carrier)) != nil {
                self.countCarrier(of: session, -1)
            }
            if started, !session.isEnded, let error {
                self.logger.warning("multiplexed data channel lost", metadata: ["error": "\(error)"])
            }
        }
        do {
            try carrier.start()
        } catch {
            return logger.warning("cannot watch a multiplexed data channel", metadata: ["error": "\(error)"])
        }
        // A carrier whose first read failed closed inside start(): nothing to keep.
        guard !carrier.isClosed else { return }
        started = true
        carriers[ObjectIdentifier(carrier)] = (carrier, session)
        countCarrier(of: session, 1)
        proxies.carrierUp(on: self)
    }

    /// A `-D` request's exit stream, on this loop's least busy carrier of a serving
    /// session that is not leaving (see `hasExitCarrier`). Nil when none is up.
    func openExitStream(_ payload: [UInt8]) -> MuxStream? {
        loop.assertInLoop()
        return carriers.values.filter { !$0.carrier.isClosed && $0.session.isServing && !$0.session.isEnded }
            .min { $0.carrier.streamCount < $1.carrier.streamCount }?.carrier.open(payload)
    }

    /// A visitor of a `-R proxy:` service: it speaks SOCKS5 or HTTP proxy to this
    /// client, which is its exit. One that came on a carrier may ask for UDP
    /// associations: their relay sockets are on the server that carrier reaches.
    private func serveProxyVisitor(_ stream: Duplex, spec: ServiceSpec, visitor: String, carrier: MuxConnection? = nil) {
        guard let context = proxies.reverse else { return stream.close(reset: true) }
        let relays = carrier.flatMap { carrier in
            context.udp.map { ReverseRelayOpener(carrier: carrier, visitor: visitor, bindHost: spec.bindHost, exit: $0.exit, logger: logger) }
        }
        ProxyConnection.serve(stream, peer: visitor, peerAddress: nil, remoteRelays: relays, context: context,
                              relays: relaySet(for: spec), idleClients: proxyIdleClients)
    }

    /// A visitor arrived on a carrier: connect to its local service and relay.
    private func streamOpened(_ stream: MuxStream, _ payload: UnsafeRawBufferPointer, on carrier: MuxConnection,
                              session: SessionCredentials) {
        let serviceID: UInt32
        let visitor: String
        do {
            (serviceID, visitor) = try TunnelProtocol.decodeOpen(payload)
        } catch {
            logger.warning("malformed stream on a multiplexed data channel", metadata: ["error": "\(error)"])
            return stream.close(reset: true)
        }
        if let spec = services[serviceID], spec.kind == .proxy {
            return serveProxyVisitor(stream, spec: spec, visitor: visitor, carrier: carrier)
        }
        guard let spec = services[serviceID], spec.kind == .tcp else {
            logger.warning("multiplexed stream for an unknown service", metadata: ["service": .stringConvertible(serviceID)])
            return stream.close(reset: true)
        }
        guard admit(spec) else { return stream.close(reset: true) }
        if let addresses = resolvedLocal[serviceID] {
            return dial(stream, spec: spec, visitor: visitor, addresses: addresses, session: session)
        }
        Task(executorPreference: loop.tasks) {
            do {
                let addresses = try await self.localAddresses(of: spec)
                self.dial(stream, spec: spec, visitor: visitor, addresses: addresses, session: session)
            } catch {
                self.visitorLimits[spec.id]?.release()
                self.logger.warning("local service unreachable", metadata: ["peer": "\(visitor)", "target": "\(spec.localDescription)", "error": "\(error)"])
                stream.close(reset: true)
            }
        }
    }

    /// Connects a multiplexed visitor to its local service (callbacks on the loop, no
    /// task per visitor), then relays. The visitor holds a place under its service's
    /// limit, given back here unless a relay starts.
    private func dial(_ stream: MuxStream, spec: ServiceSpec, visitor: String, addresses: [SocketAddress], session: SessionCredentials) {
        let limit = visitorLimits[spec.id]
        let dialStarted = loop.now
        let connector = Connector(loop: loop, addresses: addresses, timeout: config.connectTimeout) { [weak self] connector, outcome in
            guard let self else { return stream.close(reset: true) }
            self.connecting[ObjectIdentifier(connector)] = nil
            switch outcome {
            case .connected(let fd, let registration, _):
                self.meters.observeConnect(since: dialStarted)
                guard self.sendProxyHeader(spec, visitor: visitor, to: fd) else {
                    limit?.release()
                    if let registration { self.loop.forget(registration: registration) }
                    Posix.close(fd)
                    return stream.close(reset: true)
                }
                guard let data = self.wrap(stream, compress: spec.compress) else {
                    limit?.release()
                    if let registration { self.loop.forget(registration: registration) }
                    return Posix.close(fd)
                }
                self.startRelay(data, localFD: fd, adopting: registration, visitor: visitor, spec: spec)
            case .exhausted(_, let lastError):
                limit?.release()
                self.meter(of: spec).count(result: "connect-failed")
                self.logger.warning("local service unreachable", metadata: ["peer": "\(visitor)", "target": "\(spec.localDescription)", "error": "\(lastError.map { "\($0)" } ?? "no address")"])
                stream.close(reset: true)
            case .cancelled:
                limit?.release()
                stream.close(reset: true)
            }
        }
        connecting[ObjectIdentifier(connector)] = (connector, session)
        connector.start()
    }

    /// `proxy_protocol`: tells the local service, before any of the visitor's bytes,
    /// who the visitor is: the address the server sent (the visitor's, or the source
    /// of the PROXY header the server took), and as destination the local service's
    /// address as dialled. A server that sent no address ("?") gets a LOCAL header.
    /// False (logged) when the header could not be written.
    private func sendProxyHeader(_ spec: ServiceSpec, visitor: String, to fd: Int32) -> Bool {
        guard let version = spec.proxyProtocol else { return true }
        var header = ProxyHeader.local
        if let source = SocketAddress(description: visitor), let local = try? Net.peerAddress(fd) {
            header = .proxied(source: source, destination: local)
        }
        do {
            try header.write(version, to: fd)
            return true
        } catch {
            meter(of: spec).count(result: "connect-failed")
            logger.warning("cannot send PROXY header", metadata: ["peer": "\(visitor)", "target": "\(spec.localDescription)", "error": "\(error)"])
            return false
        }
    }

    // MARK: UDP services

    /// A UDP service's data channel: per-visitor sessions to the local service until the
    /// channel closes (the server then asks for a new one).
    private func startUDPRelay(_ channel: AsyncDuplex, spec: ServiceSpec, session: SessionCredentials) async {
        let target: [SocketAddress]
        do {
            target = try await Resolver.resolve(host: spec.localHost, port: spec.localPort, passive: false, on: loop)
        } catch {
            logger.warning("local service unreachable", metadata: ["target": "\(spec.localDescription)", "error": "\(error)"])
            return channel.fail(.closed)
        }
        guard channel.isOpen, let data = wrap(channel.detach(), compress: spec.compress) else { return }
        let relay = ClientUDPRelay(loop: loop, logger: logger, service: spec.name, stream: data, target: target,
                                   idleTimeout: config.udpIdleTimeout, maxSessions: udpMaxSessions,
                                   meter: meter(of: spec)) { [weak self] relay in
            self?.udpRelays[ObjectIdentifier(relay)] = nil
        }
        udpRelays[ObjectIdentifier(relay)] = (relay, session)
        do {
            try relay.start()
        } catch {
            relay.closeAll()
        }
    }

    // MARK: relays

    /// The data channel, compressed when the service asks for it; nil (closed) on failure.
    private func wrap(_ stream: Duplex, compress: Bool) -> Duplex? {
        guard compress else { return stream }
        do {
            return try ZlibStream(wrapping: stream)
        } catch {
            stream.close(reset: true)
            return nil
        }
    }

    /// A service's local addresses, resolved once per loop (off-loop for names).
    private func localAddresses(of spec: ServiceSpec) async throws -> [SocketAddress] {
        if let known = resolvedLocal[spec.id] { return known }
        let addresses = try await Resolver.resolve(host: spec.localHost, port: spec.localPort, passive: false, on: loop)
        resolvedLocal[spec.id] = addresses
        return addresses
    }

    /// Relays a visitor admitted under its service's limit; its place is given back when the relay ends.
    private func startRelay(_ data: Duplex, localFD: Int32, adopting registration: Registration? = nil, visitor: String, spec: ServiceSpec) {
        let set = relaySet(for: spec)
        let logger = self.logger
        let target = spec.localDescription
        let limit = visitorLimits[spec.id]
        let relay = set.start(a: data, b: TCPStream(fd: localFD), adopting: registration, peer: visitor) { relay, reason in
            limit?.release()
            logger.connectionClosed(peer: visitor, "target", target, relay: relay, reason: reason)
        }
        // A relay that could not start never calls its close callback.
        if relay == nil { limit?.release() }
    }

    /// This loop's relay set of a service, made (and metered) on first use.
    private func relaySet(for spec: ServiceSpec) -> RelaySet {
        if let known = serviceRelays[spec.id] { return known }
        let set = relays.makeSet()
        serviceRelays[spec.id] = set
        meter(of: spec).watch(set)
        return set
    }

    private func meter(of spec: ServiceSpec) -> ServiceMeter {
        meters.service(spec.name, kind: spec.kindName)
    }

    // MARK: ending

    /// `session` ended: closes its pooled channels and UDP relays and lets each of its
    /// carriers close after its last stream; another session's are left alone. Visitors
    /// already relayed go on (a drain waits for them). Local connections still being made
    /// for its carriers' visitors are given up, unless the session was handed over to a
    /// preferred server (`handedOver`): then its carriers drain and those visitors are
    /// relayed too.
    func sessionEnded(_ session: SessionCredentials, handedOver: Bool) {
        loop.assertInLoop()
        for (key, entry) in pooled where entry.session === session {
            pooled[key] = nil
            entry.channel.fail(.closed)
        }
        if !handedOver {
            for (key, entry) in connecting where entry.session === session {
                connecting[key] = nil
                entry.connector.cancel()
            }
        }
        for (key, entry) in carriers where entry.session === session {
            carriers[key] = nil
            countCarrier(of: session, -1)
            entry.carrier.closeWhenIdle()
        }
        for entry in udpRelays.values where entry.session === session { entry.relay.closeAll() }
    }
}
