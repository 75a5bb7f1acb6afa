import Logging
import Reactor
import Transfer

/// One authenticated control session of the client: registers the services (retrying
/// those the server refused after a reconnect), hands each data-channel request to the
/// next loop in turn, and keeps the heartbeat. Either end that leaves on purpose says
/// goodbye and the other closes the control channel, so that neither takes the channels
/// going away for a fault.
///
/// Data channels being opened or waiting for the server's command are capped
/// (`channelsOpeningMax`): without multiplexing the server asks for one per waiting
/// visitor, so a visitor flood would otherwise open channels until descriptors run out.
/// Requests beyond the cap wait in a bounded queue, oldest dropped first (the server
/// forgets a request at its deadline and asks again).
///
/// With several servers the client may hold two sessions for a moment: the one serving
/// and a new one with a preferred server, which takes over once it holds every service
/// (`TunnelClient.servicesExposed`); the old one is then handed over (`handOver`).
///
/// Thread confinement: lives on the client's main loop.
final class ClientSession {
    private unowned let client: TunnelClient
    private let control: AsyncDuplex
    let credentials: SessionCredentials
    /// The index of this session's server among the client's servers.
    var server: Int { credentials.server }
    /// Set when the session ended on a service refused before the client was ready:
    /// the client then exits with it.
    private(set) var fatal: FatalClientError?
    /// Whether this session leaves because another took over its services; its
    /// carriers then drain instead of giving up visitors still being connected.
    private var handedOver = false
    /// Set while the session is being handed over: its services are unregistered, and
    /// this timer says goodbye.
    private var handover: LoopTimer?
    private let loops: [ClientLoop]
    private var nextLoop = 0
    private var heartbeat: HeartbeatTimer?
    private var retryTimers: [LoopTimer] = []
    private var channelsOpening = 0
    private var queuedRequests: [[UInt8]] = []
    private let channelsOpeningMax: Int
    private var ended = false
    /// Set while this client says goodbye: the server's close of the control channel
    /// ends the session, or this timer does when the server does not answer.
    private var leaving: LoopTimer?
    private var endWaiters: [CheckedContinuation<Void, Never>] = []
    /// The ready line of each service the server accepted in this session.
    private(set) var readyLines: [UInt32: String] = [:]
    /// Where the server exposed each service, by name, as its ready line says.
    private(set) var exposedAt: [String: String] = [:]
    /// `useExit` went out and its answer has not come: a server that predates exits
    /// closes the control channel instead of answering.
    private var awaitingExitAnswer = false
    /// What the server answered to `useExit`, once it did.
    private(set) var exitAnswer: ClientProxies.ExitAnswer?
    private var logger: Logger { client.logger }
    private var loop: EventLoop { client.loop }
    /// Seconds between retries of a service the server refused after a reconnect.
    private static let registrationRetry: Duration = .seconds(5)
    /// How long a goodbye waits for the server to close its end.
    private static let goodbyeDeadline: Duration = .seconds(1)
    /// How long a handed-over session stays after unregistering its services: visitors
    /// the server accepted just before are waiting for a data channel, whose connect and
    /// handshake take a few round trips.
    private static let handoverGrace: Duration = .seconds(2)

    init(client: TunnelClient, control: AsyncDuplex, credentials: SessionCredentials, loops: [ClientLoop]) {
        self.client = client
        self.control = control
        self.credentials = credentials
        self.loops = loops
        channelsOpeningMax = Self.channelsOpeningMax(client.config)
        let misses = client.config.heartbeat.misses
        let logger = client.logger
        heartbeat = HeartbeatTimer(loop: client.loop, heartbeat: client.config.heartbeat,
            sendPing: { [unowned control] now in control.send(TunnelProtocol.encode(TunnelProtocol.ClientControl.ping(now))) },
            onSilence: { [unowned control] in
                logger.warning("server stopped answering", metadata: ["missed": .stringConvertible(misses)])
                control.fail(.timedOut("heartbeat"))
            })
    }

    /// Registers the services and serves the control channel, in a task of its own,
    /// until it dies or either end leaves (`waitUntilEnded`). A service refused before
    /// the client is ready sets `fatal` and leaves, saying goodbye.
    func start() {
        loop.assertInLoop()
        Task(executorPreference: loop.tasks) { await self.serve() }
    }

    private func serve() async {
        for spec in client.services { register(spec) }
        if !client.config.dynamic.isEmpty {
            control.send(TunnelProtocol.encode(.useExit))
            awaitingExitAnswer = true
        }
        heartbeat?.start()
        defer { end() }
        do {
            while !ended {
                let message = try await TunnelProtocol.read(TunnelProtocol.ServerControl.self, from: control)
                heartbeat?.heard()
                switch message {
                case .serviceAccepted(let sid, let address):
                    guard let spec = client.service(sid), leaving == nil, handover == nil else { continue }
                    let exposed = client.serviceExposed(spec, address: address, server: server)
                    readyLines[sid] = exposed.line
                    exposedAt[spec.name] = exposed.address
                    client.servicesExposed(by: self)
                case .serviceRefused(let sid, let refusal):
                    guard let spec = client.service(sid), leaving == nil, handover == nil else { continue }
                    if let error = client.serviceRefused(spec, reason: refusal.reason) {
                        fatal = error
                        leave(reason: "exiting: a service was refused")
                        continue
                    }
                    retryTimers.append(loop.schedule(after: Self.registrationRetry) { [weak self, weak client] in
                        // Unless a reload removed or replaced it meanwhile.
                        guard client?.service(spec.id) != nil else { return }
                        self?.register(spec)
                    })
                case .exitAccepted:
                    awaitingExitAnswer = false
                    exitAnswer = .accepted
                    client.exitAnswered(.accepted, by: self)
                case .exitRefused(let refusal):
                    awaitingExitAnswer = false
                    exitAnswer = .refused(refusal.reason)
                    client.exitAnswered(.refused(refusal.reason), by: self)
                case .openData(let nonce):
                    openData(nonce)
                case .ping(let x):
                    control.send(TunnelProtocol.encode(TunnelProtocol.ClientControl.pong(x)))
                case .pong:
                    break
                case .goodbye(let reason):
                    logger.info("disconnected from server", metadata: ["reason": "\(reason)"])
                    return
                }
            }
        } catch {
            if awaitingExitAnswer && !ended && leaving == nil {
                fatal = client.exitUnsupported(error)
            } else if !ended && leaving == nil {
                logger.warning("control channel lost", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Hands the services over to a session with the preferred `server`:
    /// unregisters them, which closes their ports on this server, serves the data
    /// channels its visitors accepted before still ask for, and says goodbye after
    /// `handoverGrace`. Visitors relayed through this server go on until they end.
    func handOver(to server: ServerEndpoint) {
        loop.assertInLoop()
        guard !ended, leaving == nil, handover == nil else { return }
        for t in retryTimers { t.cancel() }
        retryTimers.removeAll()
        for spec in client.services { control.send(TunnelProtocol.encode(.unregisterService(id: spec.id))) }
        handover = loop.schedule(after: Self.handoverGrace) { [weak self] in
            self?.leave(reason: "moving to the preferred server \(server)", handingOver: true)
        }
    }

    /// Tells the server this client is leaving (a drain, a fatal refusal, or
    /// `handingOver` to a session with a preferred server); the server's close of the
    /// control channel, or the deadline, ends the session.
    func leave(reason: String, handingOver: Bool = false) {
        loop.assertInLoop()
        guard !ended, leaving == nil else { return }
        handedOver = handingOver
        handover?.cancel()
        handover = nil
        // From now on the server closes this session's channels and carriers: no failure.
        credentials.end()
        for t in retryTimers { t.cancel() }
        retryTimers.removeAll()
        control.send(TunnelProtocol.encode(TunnelProtocol.ClientControl.goodbye(reason: reason)))
        leaving = loop.schedule(after: Self.goodbyeDeadline) { [weak self] in self?.end() }
    }

    func waitUntilEnded() async {
        loop.assertInLoop()
        guard !ended else { return }
        await withCheckedContinuation { endWaiters.append($0) }
    }

    /// A reload changed the services on this live session: the removed ones are
    /// unregistered, the added ones registered; the others and their visitors stay.
    func servicesChanged(removed: [ServiceSpec], added: [ServiceSpec]) {
        loop.assertInLoop()
        guard !ended, handover == nil else { return }
        for spec in removed { control.send(TunnelProtocol.encode(.unregisterService(id: spec.id))) }
        for spec in added { register(spec) }
    }

    private func register(_ spec: ServiceSpec) {
        guard !ended else { return }
        switch spec.kind {
        case .secret:
            control.send(TunnelProtocol.encode(.registerSecret(id: spec.id, name: spec.name)))
        case .tcp, .udp, .proxy:
            control.send(TunnelProtocol.encode(.registerService(TunnelProtocol.ServiceRequest(
                id: spec.id, kind: spec.kind == .udp ? .udp : .tcp, bindHost: spec.bindHost ?? "",
                port: spec.remotePort, compress: spec.compress))))
        }
    }

    /// Channels opening or pooled at once: the pool and the carriers, and as many more
    /// for visitors; part of `VisitorLimit.reserve`.
    static func channelsOpeningMax(_ config: TunnelClientConfig) -> Int {
        32 + config.pool + config.mux
    }

    /// The server wants a data channel: the next loop in turn opens it, or it waits for
    /// a place.
    private func openData(_ nonce: [UInt8]) {
        guard channelsOpening >= channelsOpeningMax else { return dispatch(nonce) }
        queuedRequests.append(nonce)
        if queuedRequests.count > Self.queuedRequestsMax { queuedRequests.removeFirst() }
    }

    /// Requests kept waiting for a place; older ones are past use by the time the queue
    /// is this long (the server asks again for what it still needs).
    private static let queuedRequestsMax = 1024

    private func dispatch(_ nonce: [UInt8]) {
        channelsOpening += 1
        let target = loops[nextLoop]
        nextLoop = (nextLoop + 1) % loops.count
        let credentials = self.credentials
        let session = Handoff(self)
        let home = loop
        target.run {
            Task(executorPreference: target.loop.tasks) {
                await target.openDataChannel(nonce: nonce, session: credentials)
                home.execute { session.value.channelSettled() }
            }
        }
    }

    /// A channel was placed (a carrier, a visitor, a UDP service) or failed: its place
    /// goes to the oldest waiting request.
    private func channelSettled() {
        channelsOpening -= 1
        guard !ended, !queuedRequests.isEmpty else { return }
        dispatch(queuedRequests.removeFirst())
    }

    /// Closes the control channel and tells every loop; running relays go on.
    func end() {
        loop.assertInLoop()
        guard !ended else { return }
        ended = true
        heartbeat?.stop()
        heartbeat = nil
        leaving?.cancel()
        leaving = nil
        handover?.cancel()
        handover = nil
        for t in retryTimers { t.cancel() }
        retryTimers.removeAll()
        queuedRequests.removeAll()
        credentials.end()
        let (credentials, handedOver) = (self.credentials, self.handedOver)
        for l in loops { l.run { l.sessionEnded(credentials, handedOver: handedOver) } }
        control.close()
        let waiters = endWaiters
        endWaiters.removeAll()
        for w in waiters { w.resume() }
    }
}
