import Logging
import Reactor
import Transfer

/// One authenticated control session of the client: registers the services (retrying
/// those the server refused after a reconnect), hands each data-channel request to the
/// next loop in turn, and keeps the heartbeat.
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
        for spec in client.services { register(spec) }
        heartbeat?.start()
        defer { end() }
        do {
            while !ended {
                let message = try await TunnelProtocol.read(TunnelProtocol.ServerControl.self, from: control)
                heartbeat?.heard()
                switch message {
                case .serviceAccepted(let sid, let address):
                    guard let spec = client.service(sid) else { continue }
                    client.serviceExposed(spec, address: address)
                case .serviceRefused(let sid, let refusal):
                    guard let spec = client.service(sid) else { continue }
                    try client.serviceRefused(spec, reason: refusal.reason, firstSession: firstSession)
                    retryTimers.append(loop.schedule(after: Self.registrationRetry) { [weak self, weak client] in
                        // Unless a reload removed or replaced it meanwhile.
                        guard client?.service(spec.id) != nil else { return }
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

    /// A reload changed the services on this live session: the removed ones are
    /// unregistered, the added ones registered; the others and their visitors stay.
    func servicesChanged(removed: [ServiceSpec], added: [ServiceSpec]) {
        loop.assertInLoop()
        guard !ended else { return }
        for spec in removed { control.send(TunnelProtocol.encode(.unregisterService(id: spec.id))) }
        for spec in added { register(spec) }
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

    /// The server wants a data channel: the next loop in turn opens it.
    private func openData(_ nonce: [UInt8]) {
        let target = loops[nextLoop]
        nextLoop = (nextLoop + 1) % loops.count
        let credentials = self.credentials
        target.run {
            Task(executorPreference: target.loop.tasks) { await target.openDataChannel(nonce: nonce, session: credentials) }
        }
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
        credentials.end()
        for l in loops { l.run { l.sessionEnded() } }
        control.close()
    }
}
