import Logging
import Reactor
import Transfer

/// One authenticated control session of the client: registers the services (retrying
/// those the server refused after a reconnect), hands each data-channel request to the
/// next loop in turn, and keeps the heartbeat.
///
/// Data channels being opened or waiting for the server's command are capped
/// (`channelsOpeningMax`): without multiplexing the server asks for one per waiting
/// visitor, so a visitor flood would otherwise open channels until descriptors run out.
/// Requests beyond the cap wait in a bounded queue, oldest dropped first (the server
/// forgets a request at its deadline and asks again).
///
/// Thread confinement: lives on the client's main loop.
final class ClientSession {
    private unowned let client: TunnelClient
    private let control: AsyncDuplex
    private let credentials: SessionCredentials
    private let loops: [ClientLoop]
    private var nextLoop = 0
    private var heartbeat: HeartbeatTimer?
    private var retryTimers: [LoopTimer] = []
    private var channelsOpening = 0
    private var queuedRequests: [[UInt8]] = []
    private let channelsOpeningMax: Int
    private var ended = false
    private var logger: Logger { client.logger }
    private var loop: EventLoop { client.loop }
    /// Seconds between retries of a service the server refused after a reconnect.
    private static let registrationRetry: Duration = .seconds(5)

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

    /// Serves the control channel until it dies. Throws `FatalClientError` when a
    /// service is refused on the first session.
    func run(firstSession: Bool) async throws {
        let services = Dictionary(client.config.services.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
        for spec in client.config.services { register(spec) }
        heartbeat?.start()
        defer { end() }
        do {
            while !ended {
                let message = try await TunnelProtocol.read(TunnelProtocol.ServerControl.self, from: control)
                heartbeat?.heard()
                switch message {
                case .serviceAccepted(let sid, let address):
                    guard let spec = services[sid] else { continue }
                    client.serviceExposed(spec, address: address)
                case .serviceRefused(let sid, let refusal):
                    guard let spec = services[sid] else { continue }
                    try client.serviceRefused(spec, reason: refusal.reason, firstSession: firstSession)
                    retryTimers.append(loop.schedule(after: Self.registrationRetry) { [weak self] in
                        self?.register(spec)
                    })
                case .openData(let nonce):
                    openData(nonce)
                case .ping(let x):
                    control.send(TunnelProtocol.encode(TunnelProtocol.ClientControl.pong(x)))
                case .pong:
                    break
                }
            }
        } catch let fatal as FatalClientError {
            throw fatal
        } catch {
            if !ended { logger.warning("control channel lost", metadata: ["error": "\(error)"]) }
        }
    }

    private func register(_ spec: ServiceSpec) {
        guard !ended else { return }
        switch spec.kind {
        case .secret:
            control.send(TunnelProtocol.encode(.registerSecret(id: spec.id, name: spec.name)))
        case .tcp, .udp:
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
        for t in retryTimers { t.cancel() }
        retryTimers.removeAll()
        queuedRequests.removeAll()
        credentials.end()
        for l in loops { l.run { l.sessionEnded() } }
        control.close()
    }
}
