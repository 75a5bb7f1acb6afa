import Logging
import Reactor
import Transfer

/// One authenticated client on the server: its control channel and heartbeat, its
/// services (`ServiceRegistry`) and its data channels (`ChannelPool`). A session whose
/// client asked to visit a secret service hands its connection over and ends.
///
/// Thread confinement: lives on `home`'s loop; other loops reach it through the
/// session directory's loop.
final class ServerSession {
    let id: [UInt8]
    let peer: String
    private let home: ServerLoop
    private let context: ServerContext
    private let control: AsyncDuplex
    private let services: ServiceRegistry
    private let channels: ChannelPool
    private var heartbeat: HeartbeatTimer?
    private var ended = false
    /// Set while the server says goodbye: the client's close of the control channel ends
    /// the session, or this timer does when the client does not answer.
    private var leaving: LoopTimer?
    private var endWaiters: [CheckedContinuation<Void, Never>] = []
    /// How long a goodbye waits for the client to close its end.
    private static let goodbyeDeadline: Duration = .seconds(1)
    private static let shuttingDown = "server shutting down"
    private var loop: EventLoop { home.loop }
    private var logger: Logger { context.logger }

    init(home: ServerLoop, control: AsyncDuplex, id: [UInt8], peer: String, sessionKey: [UInt8], poolSize: Int, muxChannels: Int) {
        self.home = home
        context = home.context
        self.control = control
        self.id = id
        self.peer = peer
        services = ServiceRegistry(home: home, context: home.context, peer: peer)
        channels = ChannelPool(home: home, context: home.context, sessionID: id, sessionKey: sessionKey, peer: peer,
                               poolSize: poolSize, muxChannels: muxChannels) { [unowned control] frame in control.send(frame) }
        services.onVisitor = { [unowned channels] stream, visitor, service in
            channels.visitorArrived(stream, peer: visitor, service: service)
        }
        services.onUDPNeedsChannel = { [unowned channels] service, udp in channels.udpNeedsChannel(service, udp) }
        let misses = context.config.heartbeat.misses
        heartbeat = HeartbeatTimer(loop: home.loop, heartbeat: context.config.heartbeat,
            sendPing: { [unowned control] now in control.send(TunnelProtocol.encode(TunnelProtocol.ServerControl.ping(now))) },
            onSilence: { [unowned control] in control.fail(.timedOut("heartbeat (\(misses) missed)")) })
    }

    /// Serves the control channel until it dies; then releases everything the client had.
    func run() async {
        channels.requestChannels()
        heartbeat?.start()
        var reason = "control channel closed"
        do {
            while !ended {
                let message = try await TunnelProtocol.read(TunnelProtocol.ClientControl.self, from: control)
                heartbeat?.heard()
                switch message {
                case .registerService(let request):
                    answer(request.id, port: request.port, services.register(request))
                case .registerSecret(let sid, let name):
                    answer(sid, port: 0, services.registerSecret(sid, name: name, session: SessionDirectory.Entry(loop: loop, session: self)))
                case .unregisterService(let sid):
                    services.unregister(sid, session: self)
                case .visit(let name):
                    try await visit(name)
                    return
                case .ping(let x):
                    control.send(TunnelProtocol.encode(TunnelProtocol.ServerControl.pong(x)))
                case .pong:
                    break
                case .goodbye(let said):
                    // The client's own end: its channels go with it, nothing was lost.
                    return end(reason: said)
                }
            }
        } catch {
            reason = "\(error)"
        }
        // Without a goodbye the client (or the network to it) failed.
        if leaving != nil { return end(reason: Self.shuttingDown) }
        end(reason: reason, level: .warning)
    }

    private func answer(_ id: UInt32, port: UInt16, _ result: Result<String, TunnelProtocol.Refusal>) {
        switch result {
        case .success(let address):
            control.send(TunnelProtocol.encode(.serviceAccepted(id: id, address: address)))
        case .failure(let refusal):
            control.send(TunnelProtocol.encode(.serviceRefused(id: id, refusal)))
            logger.warning("service refused", metadata: ["peer": "\(peer)", "port": .stringConvertible(port), "reason": "\(refusal.reason)"])
        }
    }

    /// This session is a visitor: hand its connection to the secret service's client.
    /// The visitor and that client then prove the service token to each other end to
    /// end; the server only pairs the two connections.
    private func visit(_ name: String) async throws {
        guard let (exposer, sid) = context.directory.secret(name), exposer.session !== self else {
            control.send(TunnelProtocol.encode(TunnelProtocol.VisitAnswer.refused(.init(.noSuchService, "no secret service named '\(name)'"))))
            try? await control.flush()
            logger.warning("visit refused: unknown secret service", metadata: ["peer": "\(peer)", "service": "\(name)"])
            end(reason: "visit refused")
            return
        }
        // The connection becomes the visitor's end: whatever this session set up as a
        // client (services, channels) goes now, as at any end.
        ended = true
        heartbeat?.stop()
        services.closeAll(session: self)
        channels.end()
        control.send(TunnelProtocol.encode(.visitAccepted))
        do {
            try await control.flush()
        } catch {
            control.close()
            throw error
        }
        logger.info("visitor connected", metadata: ["peer": "\(peer)", "service": "\(name)"])
        let handoff = Handoff(control.detach())
        let peer = self.peer
        exposer.loop.execute { exposer.session.visitorArrived(handoff.value, peer: peer, service: sid) }
    }

    /// A secret service's visitor, handed over by the visitor's session.
    func visitorArrived(_ stream: Duplex, peer visitor: String, service id: UInt32) {
        loop.assertInLoop()
        guard !ended, let service = services[id] else { return stream.close(reset: true) }
        channels.visitorArrived(stream, peer: visitor, service: service)
    }

    /// A data channel for this session, from whichever loop accepted it.
    func dataChannelArrived(_ arrival: DataChannelArrival) {
        loop.assertInLoop()
        guard !ended, channels.accept(nonce: arrival.nonce, proof: arrival.proof) else {
            if context.refusals.record("data_rejected") {
                logger.warning("data channel rejected: unknown session, used nonce or bad proof", metadata: ["peer": "\(arrival.peer)"])
            }
            return arrival.stream.close(reset: true)
        }
        channels.channelArrived(arrival.stream, home: arrival.home)
    }

    /// Closes the exposed ports (for a graceful drain), keeping running relays.
    func stopAccepting() {
        loop.assertInLoop()
        services.closeAll(session: self)
    }

    /// The server is shutting down: tells the client, so that both ends part without a
    /// warning. The client ends its session and closes the control channel, which ends
    /// this one; only then are the carriers closed here, when the client has stopped
    /// watching them.
    func leave() {
        loop.assertInLoop()
        guard !ended, leaving == nil else { return }
        channels.sessionLeaving()
        control.send(TunnelProtocol.encode(TunnelProtocol.ServerControl.goodbye(reason: Self.shuttingDown)))
        leaving = loop.schedule(after: Self.goodbyeDeadline) { [weak self] in self?.end(reason: Self.shuttingDown) }
    }

    func waitUntilEnded() async {
        loop.assertInLoop()
        guard !ended else { return }
        await withCheckedContinuation { endWaiters.append($0) }
    }

    /// Releases the client's ports, pooled channels and waiting visitors. `level` is
    /// warning for a fault (the client vanished, stopped answering, or was cut off).
    func end(reason: String, level: Logger.Level = .info) {
        loop.assertInLoop()
        guard !ended else { return }
        ended = true
        heartbeat?.stop()
        heartbeat = nil
        leaving?.cancel()
        leaving = nil
        services.closeAll(session: self)
        channels.end()
        control.close()
        logger.log(level: level, "client disconnected", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
        let waiters = endWaiters
        endWaiters.removeAll()
        for w in waiters { w.resume() }
    }
}
