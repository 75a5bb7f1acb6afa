import Logging
import Reactor
import Transfer

/// One loop's share of a tunnel server: its SO_REUSEPORT socket of the tunnel port, the
/// connections it is authenticating, the sessions whose control channel it accepted, and
/// whatever other sessions placed here (carriers, dedicated data channels) with the
/// visitor relays that ride them, kept in one relay set per service.
///
/// Thread confinement: everything but `loop`, `index` and `run` is touched on `loop`
/// only; other loops hand it work with `run`.
final class ServerLoop: @unchecked Sendable {
    let loop: EventLoop
    let index: Int
    /// Set once by the context, before any loop runs server code.
    unowned(unsafe) var context: ServerContext!
    let relays: RelayGroup
    let meters: LoopMeters
    /// One datagram batch for every UDP service on this loop (one handler runs at a time).
    let datagramBatch = DatagramBatch()
    private let listeners: Listeners
    private var sessions: [ObjectIdentifier: ServerSession] = [:]
    /// This loop's relay set of each service whose visitors ride channels here.
    private var serviceRelays: [UInt64: RelaySet] = [:]
    /// The exit streams of carriers here (`ServerExit`), dialing or relayed.
    private(set) lazy var exitRelays: RelaySet = relays.makeSet()
    private var logger: Logger { context.logger }

    init(loop: EventLoop, index: Int, logger: Logger, refusals: RefusalSummary) {
        self.loop = loop
        self.index = index
        relays = RelayGroup(loop: loop, logger: logger)
        meters = LoopMeters(loop: loop)
        listeners = Listeners(loop: loop, logger: logger, refusals: refusals)
    }

    /// Runs `body` on this loop: at once when already there, else through its inbox.
    func run(_ body: @escaping @Sendable () -> Void) {
        if loop.inEventLoop { body() } else { loop.execute(body) }
    }

    func startAccepting(_ bound: [LoopListeners.Listener]) {
        loop.assertInLoop()
        do {
            try listeners.start(bound) { [unowned self] fd, peer in accepted(fd, peer: peer) }
        } catch {
            logger.error("cannot watch listener", metadata: ["listen": "\(bound.map { "\($0.address)" }.joined(separator: ","))", "error": "\(error)"])
        }
    }

    // MARK: draining

    /// Closes the tunnel socket and every service port of the sessions here; returns the
    /// relays still running on this loop.
    func stopAccepting() -> Int {
        loop.assertInLoop()
        listeners.stop()
        for s in sessions.values { s.stopAccepting() }
        return relays.count
    }

    /// Says goodbye to every client here at once; returns when all sessions have ended.
    func endSessions() async {
        loop.assertInLoop()
        let here = Array(sessions.values)
        for s in here { s.leave() }
        for s in here { await s.waitUntilEnded() }
    }

    /// This loop's share of the server's metrics, its sessions included.
    func sample() -> MetricsSnapshot {
        var snapshot = meters.sample()
        snapshot.tunnelSessions = sessions.count
        return snapshot
    }

    // MARK: visitor relays

    /// Relays a visitor over the data stream it rides (a multiplexed stream or a
    /// dedicated channel on this loop), in this loop's set for its service. The wait
    /// since the visitor arrived (`arrivedAt`) is its connect duration.
    func startRelay(visitor: Duplex, data channel: Duplex, service: ExposedService, peer: String, arrivedAt: UInt64) {
        loop.assertInLoop()
        meters.observeConnect(since: arrivedAt)
        // Both may be WebSockets (a secret service's visitor is one); their pings start
        // here, on the loop that keeps them.
        (channel as? LayerKeepalive)?.startLayerKeepalive(on: loop)
        (visitor as? LayerKeepalive)?.startLayerKeepalive(on: loop)
        var data = channel
        var zlib: ZlibStream?
        if service.compress {
            do {
                let z = try ZlibStream(wrapping: data)
                zlib = z
                data = z
            } catch {
                data.close(reset: true)
                visitor.close(reset: true)
                return
            }
        }
        let set = relaySet(for: service)
        let logger = self.logger
        let listen = service.listen
        set.start(a: visitor, b: data, peer: peer) { relay, reason in
            // With compression, what crossed the tunnel next to the visitor's bytes.
            let wire: Logger.Metadata = zlib.map {
                ["wire_up": .stringConvertible($0.compressedOut), "wire_down": .stringConvertible($0.compressedIn)]
            } ?? [:]
            logger.connectionClosed(peer: peer, "listen", listen, relay: relay, reason: reason, extra: wire)
        }
        // The service may have gone while this visitor was on its way here.
        if service.isRetired { retire(service) }
    }

    /// Sends a dedicated channel its `connect` frame, then relays the visitor over it.
    /// The frame nearly always fits the socket at once; only when it does not, a task waits.
    func startDedicated(_ stream: Duplex, frame: [UInt8], visitor: Duplex, service: ExposedService, peer: String, arrivedAt: UInt64) {
        loop.assertInLoop()
        let channel: AsyncDuplex
        do {
            channel = try AsyncDuplex(loop: loop, duplex: stream)
        } catch {
            stream.close(reset: true)
            visitor.close(reset: true)
            return
        }
        channel.send(frame)
        guard channel.hasPendingOutput else {
            return startRelay(visitor: visitor, data: channel.detach(), service: service, peer: peer, arrivedAt: arrivedAt)
        }
        Task(executorPreference: loop.tasks) {
            do {
                try await channel.flush()
            } catch {
                visitor.close(reset: true)
                self.logger.warning("data channel failed before use", metadata: ["peer": "\(peer)", "error": "\(error)"])
                return
            }
            self.startRelay(visitor: visitor, data: channel.detach(), service: service, peer: peer, arrivedAt: arrivedAt)
        }
    }

    private func relaySet(for service: ExposedService) -> RelaySet {
        if let set = serviceRelays[service.key] { return set }
        let set = relays.makeSet()
        serviceRelays[service.key] = set
        let meter = meters.service(service.listen, kind: "tcp")
        if case .tcp = service.kind { meter.ports = service.listen.split(separator: ",").map(String.init) }
        meter.watch(set)
        return set
    }

    /// The service is gone: its set here leaves once its last relay ended.
    func retire(_ service: ExposedService) {
        loop.assertInLoop()
        if let set = serviceRelays.removeValue(forKey: service.key) { relays.retire(set) }
    }

    // MARK: new connections

    private func accepted(_ fd: Int32, peer: SocketAddress?) {
        guard !context.draining.load(ordering: .relaxed) else { return Net.closeWithReset(fd) }
        let budget = context.unauthenticated
        switch budget.admit(peer.map(SourceAddress.init) ?? .v4(0), on: loop) {
        case .refused(let refusal):
            Net.closeWithReset(fd)
            guard context.refusals.record(refusal.rawValue) else { return }
            switch refusal {
            case .limit:
                logger.warning("connection refused: too many unauthenticated connections",
                               metadata: ["peer": "\(peer.logDescription)", "max": .stringConvertible(budget.max)])
            case .perSource:
                logger.warning("connection refused: too many unauthenticated connections from this address",
                               metadata: ["peer": "\(peer.logDescription)", "max": .stringConvertible(budget.perSource)])
            }
        case .admitted(let pending):
            let peerText = peer?.description ?? "?"
            Task(executorPreference: loop.tasks) { await self.handshake(fd: fd, peer: peerText, pending: pending) }
        }
    }

    /// Runs the transport's handshake and reads the first frame of a new connection:
    /// a control channel stays here; a data channel goes to its session's loop. The
    /// whole exchange must finish within the handshake timeout, and holds a place in the
    /// unauthenticated budget until then.
    private func handshake(fd: Int32, peer: String, pending: PendingHandshake) async {
        let budget = context.unauthenticated
        let channel: AsyncDuplex
        let transportHandshake: Transport.Handshake
        do {
            (channel, transportHandshake) = try context.transport.channel(fd, on: loop)
        } catch {
            budget.release(pending)
            if context.refusals.record("setup_failed") {
                logger.warning("cannot set up connection", metadata: ["peer": "\(peer)", "error": "\(error)"])
            }
            return
        }
        let timer = loop.schedule(after: context.config.handshakeTimeout) {
            channel.fail(.timedOut("handshake"))
        }
        var inBudget = true
        func leaveBudget() {
            guard inBudget else { return }
            inBudget = false
            timer.cancel()
            pending.finished()
            budget.release(pending)
        }
        defer { leaveBudget() }
        do {
            guard pending.started(channel) else { throw ChannelError.closed }
            do {
                try await transportHandshake(channel)
            } catch let error as TLSError {
                // With the token's PSK, a wrong token fails here, before any proof is sent.
                meters.countAuthFailure(reason: "tls_handshake")
                throw error
            }
            switch try await TunnelProtocol.read(TunnelProtocol.Hello.self, from: channel) {
            case .controlHello(let version, let clientNonce):
                guard let session = try await authenticateControl(channel, peer: peer, version: version, clientNonce: clientNonce) else { return }
                leaveBudget()
                budget.sessionStarted(pending.source)
                sessions[ObjectIdentifier(session)] = session
                (channel.duplex as? LayerKeepalive)?.startLayerKeepalive(on: loop)
                await session.run()
                sessions[ObjectIdentifier(session)] = nil
                budget.sessionEnded(pending.source)
                context.directory.remove(session.id)
            case .dataHello(let version, let sessionID, let nonce, let proof):
                guard version == TunnelProtocol.version, let entry = context.directory.session(sessionID) else {
                    if context.directory.hasDeparted(sessionID) {
                        logger.info("data channel of a client that left, closed", metadata: ["peer": "\(peer)"])
                        channel.close()
                        return
                    }
                    meters.countAuthFailure(reason: "data_rejected")
                    if context.refusals.record("data_rejected") {
                        logger.warning("data channel rejected: unknown session, used nonce or bad proof", metadata: ["peer": "\(peer)"])
                    }
                    channel.fail(.protocolViolation("data channel rejected"))
                    return
                }
                let arrival = DataChannelArrival(stream: channel.detach(), nonce: nonce, proof: proof, home: self, peer: peer)
                entry.loop.execute { entry.session.dataChannelArrived(arrival) }
            }
        } catch let mismatch as TransportMismatch {
            // The client has its answer in flight: close without a reset that could drop it.
            channel.close()
            meters.countAuthFailure(reason: "transport_mismatch")
            if context.refusals.record("transport_mismatch") {
                logger.warning("handshake failed", metadata: ["peer": "\(peer)", "error": "\(mismatch)"])
            }
        } catch {
            channel.fail(error as? ChannelError ?? .closed)
            if pending.wasDisplaced {
                if context.refusals.record("displaced") {
                    logger.warning("connection dropped: its place went to one from an address with fewer unauthenticated connections",
                                   metadata: ["peer": "\(peer)"])
                }
            } else if error as? ChannelError == .eof || (error as? TLSError)?.isPeerClose == true {
                // A clean close before the handshake ended: a leaving client's pooled channel
                // or a port check, not a fault.
                if context.refusals.record("closed_early") {
                    logger.info("connection closed during its handshake", metadata: ["peer": "\(peer)"])
                }
            } else if context.refusals.record(error as? ChannelError == .timedOut("handshake") ? "timed_out" : "handshake_failed") {
                logger.warning("handshake failed", metadata: ["peer": "\(peer)", "error": "\(error)"])
            }
        }
    }

    /// The mutual proof exchange; nil (connection closed) when the client fails it or
    /// the server is full.
    private func authenticateControl(_ channel: AsyncDuplex, peer: String, version: UInt16, clientNonce: [UInt8]) async throws -> ServerSession? {
        let keys = context.keys
        guard version == TunnelProtocol.version else {
            channel.send(TunnelProtocol.encode(TunnelProtocol.ServerHandshake.refused(
                .init(.version, "unsupported protocol version \(version); this server speaks \(TunnelProtocol.version)"))))
            try? await channel.flush()
            channel.close()
            meters.countAuthFailure(reason: "version")
            if context.refusals.record("version") {
                logger.warning("client refused: protocol version", metadata: ["peer": "\(peer)", "version": .stringConvertible(version)])
            }
            return nil
        }
        let serverNonce = TunnelCrypto.random(TunnelProtocol.nonceSize)
        channel.send(TunnelProtocol.encode(.challenge(
            version: TunnelProtocol.version, serverNonce: serverNonce,
            serverProof: TunnelProtocol.serverProof(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce))))
        let auth: TunnelProtocol.ClientAuth
        do {
            auth = try await TunnelProtocol.read(TunnelProtocol.ClientAuth.self, from: channel)
        } catch ChannelError.eof {
            // What a client with another token does: it checks the server's proof first
            // and hangs up without a word.
            channel.close()
            if context.refusals.record("auth_failed") {
                logger.warning("authentication failed", metadata: [
                    "peer": "\(peer)", "error": "the client hung up at the server's proof: its token is not this server's",
                ])
            }
            return nil
        }
        let expected = TunnelProtocol.clientProof(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce)
        guard TunnelCrypto.constantTimeEqual(auth.clientProof, expected) else {
            meters.countAuthFailure(reason: "bad_proof")
            if context.refusals.record("auth_failed") {
                logger.warning("authentication failed", metadata: ["peer": "\(peer)"])
            }
            channel.send(TunnelProtocol.encode(TunnelProtocol.ServerHandshake.refused(.init(.authFailed, "authentication failed"))))
            try? await channel.flush()
            channel.close()
            return nil
        }
        let id = TunnelCrypto.random(TunnelProtocol.sessionIDSize)
        let session = ServerSession(
            home: self, control: channel, id: id, peer: peer,
            sessionKey: TunnelProtocol.sessionKey(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce),
            poolSize: min(Int(auth.poolSize), 64), muxChannels: min(Int(auth.muxChannels), TunnelProtocol.maxMuxChannels))
        guard !context.draining.load(ordering: .relaxed),
              context.directory.add(id, SessionDirectory.Entry(loop: loop, session: session)) else {
            let max = context.reloadable.maxClients
            channel.send(TunnelProtocol.encode(TunnelProtocol.ServerHandshake.refused(
                .init(.serverFull, "server full: \(max) clients connected"))))
            try? await channel.flush()
            channel.close()
            if context.refusals.record("max_clients") {
                logger.warning("client refused: limit reached", metadata: ["peer": "\(peer)", "max": .stringConvertible(max)])
            }
            return nil
        }
        channel.send(TunnelProtocol.encode(.welcome(sessionID: id)))
        var about: Logger.Metadata = ["peer": "\(peer)"]
        if context.config.transport.isWebSocket { about["inner"] = "\(context.config.webSocket.innerLayer(of: channel.duplex))" }
        logger.info("client connected", metadata: about)
        return session
    }
}

/// A data channel that proved nothing yet, on its way from the loop that accepted it to
/// its session's loop: the detached stream (no loop watches it) and its claimed proof.
struct DataChannelArrival: @unchecked Sendable {
    let stream: Duplex
    let nonce: [UInt8]
    let proof: [UInt8]
    /// The loop that accepted it, where it stays unless the session places it elsewhere.
    let home: ServerLoop
    let peer: String
}
