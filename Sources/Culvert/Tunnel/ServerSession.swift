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
                    answer(request.id, port: request.port, await register(request))
                case .registerSecret(let sid, let name):
                    answer(sid, port: 0, await registerSecret(sid, name: name))
                case .unregisterService(let sid):
                    services.unregister(sid, session: self)
                case .useExit:
                    control.send(TunnelProtocol.encode(context.exit.enabled ? .exitAccepted
                        : .exitRefused(.init(.exitNotAllowed, "the server is no exit: it runs without --allow-exit"))))
                case .visit(let name):
                    try await visit(name)
                    return
                case .ping(let x):
                    control.send(TunnelProtocol.encode(TunnelProtocol.ServerControl.pong(x)))
                case .pong:
                    break
                case .goodbye(let said):
                    // The client's own end: its channels go with it, nothing was lost.
                    // Channels it opened just before may still arrive: they are not a fault.
                    context.directory.departed(id)
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

    private var entry: SessionDirectory.Entry { SessionDirectory.Entry(loop: loop, session: self) }

    /// Registers a service. A port that another session holds goes to this client when
    /// that session does not answer a ping in time (see `takeOver`).
    private func register(_ request: TunnelProtocol.ServiceRequest) async -> Result<String, TunnelProtocol.Refusal> {
        let first = services.register(request, session: entry)
        guard case .failure(let refusal) = first, refusal.code == .portInUse else { return first }
        let port = SessionDirectory.Port(udp: request.kind == .udp, number: request.port)
        let holders = context.directory.holders(of: port).filter { $0.session !== self }
        guard !holders.isEmpty, await takeOver(from: holders, what: "port \(request.port)") else { return first }
        return services.register(request, session: entry)
    }

    /// Claims a secret service's name; a name held by a session that does not answer a
    /// ping in time goes to this client.
    private func registerSecret(_ id: UInt32, name: String) async -> Result<String, TunnelProtocol.Refusal> {
        let first = services.registerSecret(id, name: name, session: entry)
        guard case .failure(let refusal) = first, refusal.code == .nameTaken,
              let holder = context.directory.secret(name)?.entry, holder.session !== self,
              await takeOver(from: [holder], what: "secret service '\(name)'") else { return first }
        return services.registerSecret(id, name: name, session: entry)
    }

    /// Asks each session holding what this client wants to prove it is alive within
    /// `handoverProbe`; the silent ones are ended (a stopped or cut-off client would
    /// otherwise keep its ports until the heartbeat gives up, and its replacement would
    /// be refused all that time). True when every holder let go and this session is still
    /// up. The control channel waits meanwhile; the loop does not.
    private func takeOver(from holders: [SessionDirectory.Entry], what: String) async -> Bool {
        let deadline = context.config.handoverProbe
        let claimant = peer
        for holder in holders {
            let released = await withCheckedContinuation { (done: CheckedContinuation<Bool, Never>) in
                holder.loop.execute {
                    holder.session.yieldIfSilent(what, to: claimant, within: deadline) { done.resume(returning: $0) }
                }
            }
            guard released else { return false }
        }
        return !ended
    }

    /// Another client wants `what`, which this session holds: the session keeps it if its
    /// client answers a ping within `deadline`, and ends otherwise. `released` gets
    /// whether the session let go (also when it had ended already).
    func yieldIfSilent(_ what: String, to claimant: String, within deadline: Duration, released: @escaping (Bool) -> Void) {
        loop.assertInLoop()
        guard !ended, let heartbeat else { return released(true) }
        heartbeat.probe(within: deadline) { [weak self] answered in
            guard let self, !self.ended else { return released(true) }
            guard !answered else { return released(false) }
            let waited = DurationSpec.format(deadline)
            self.logger.warning("client did not answer a ping; its services go to a new client", metadata: [
                "peer": "\(self.peer)", "claimant": "\(claimant)", "wants": "\(what)", "deadline": .seconds(deadline),
            ])
            self.end(reason: "no answer to a ping within \(waited) while another client asked for \(what)")
            released(true)
        }
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
        services.closeAll(session: self)
        heartbeat?.stop()
        channels.end()
        // A drain waiting for this session (`leave`) is done with it: the connection is a
        // visitor's now, drained with the relays.
        leaving?.cancel()
        leaving = nil
        wakeEndWaiters()
        control.send(TunnelProtocol.encode(.visitAccepted))
        do {
            try await control.flush()
        } catch {
            control.close()
            throw error
        }
        logger.info("visitor connected", metadata: ["peer": "\(peer)", "service": "\(name)"])
        let stream = control.detach()
        (stream as? LayerKeepalive)?.stopLayerKeepalive()
        let handoff = Handoff(stream)
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
        if ended && context.directory.hasDeparted(id) {
            // Opened by the client just before its goodbye, and routed here while this
            // session was still listed: not a fault, as on the accepting loop.
            logger.info("data channel of a client that left, closed", metadata: ["peer": "\(arrival.peer)"])
            return arrival.stream.close(reset: false)
        }
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
        // Ports first: stopping the heartbeat tells a client waiting on a probe of this
        // session (`yieldIfSilent`) that the port is free, and it binds at once.
        services.closeAll(session: self)
        heartbeat?.stop()
        heartbeat = nil
        leaving?.cancel()
        leaving = nil
        channels.end()
        control.close()
        logger.log(level: level, "client disconnected", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
        wakeEndWaiters()
    }

    private func wakeEndWaiters() {
        let waiters = endWaiters
        endWaiters.removeAll()
        for w in waiters { w.resume() }
    }
}
