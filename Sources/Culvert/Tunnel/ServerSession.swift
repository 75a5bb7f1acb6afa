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
                }
            }
        } catch {
            reason = "\(error)"
        }
        end(reason: reason)
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
            logger.warning("data channel rejected: unknown session, used nonce or bad proof", metadata: ["peer": "\(arrival.peer)"])
            return arrival.stream.close(reset: true)
        }
        channels.channelArrived(arrival.stream, home: arrival.home)
    }

    /// Closes the exposed ports (for a graceful drain), keeping running relays.
    func stopAccepting() {
        loop.assertInLoop()
        services.closeAll(session: self)
    }

    /// Releases the client's ports, pooled channels and waiting visitors.
    func end(reason: String) {
        loop.assertInLoop()
        guard !ended else { return }
        ended = true
        heartbeat?.stop()
        heartbeat = nil
        services.closeAll(session: self)
        channels.end()
        control.close()
        logger.info("client disconnected", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
    }
}
