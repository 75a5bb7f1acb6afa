import Logging
import Reactor
import Transfer

/// One authenticated client on the server: its control channel, exposed services,
/// outstanding data-channel nonces, pooled data channels and waiting visitors.
///
/// Thread confinement: lives on the server's loop.
final class ServerSession {
    /// A visitor (accepted on an exposed port, or a secret service's visitor arriving
    /// through the tunnel) waiting for a data channel.
    private final class WaitingVisitor {
        let stream: Duplex
        let peer: String
        let service: UInt32
        var timer: LoopTimer?
        init(stream: Duplex, peer: String, service: UInt32) {
            self.stream = stream
            self.peer = peer
            self.service = service
        }
    }

    private final class ExposedService {
        let request: TunnelProtocol.ServiceRequest
        let listeners: Listeners
        /// The bound addresses, as close lines name the service.
        let listen: String
        init(request: TunnelProtocol.ServiceRequest, listeners: Listeners) {
            self.request = request
            self.listeners = listeners
            listen = listeners.addresses.map(\.description).joined(separator: ",")
        }
    }

    let id: [UInt8]
    let peer: String
    private unowned let server: TunnelServer
    private let control: AsyncDuplex
    private let sessionKey: [UInt8]
    private let poolSize: Int
    /// How many multiplexed data channels carry this client's TCP visitors (0: none,
    /// each visitor gets a dedicated data channel).
    private let muxChannels: Int
    private var carriers: [MuxConnection] = []
    /// Channels told to become carriers whose `mux` frame is still being flushed.
    private var carriersStarting = 0
    /// TCP visitors waiting for a multiplexed data channel (only before the first is up).
    private var muxWaiting: [WaitingVisitor] = []
    private var services: [UInt32: ExposedService] = [:]
    /// UDP services: id → (service, compressed).
    private var udpServices: [UInt32: (ServerUDPService, Bool)] = [:]
    /// UDP services waiting for a data channel to carry their datagrams.
    private var udpWaiting: [ServerUDPService] = []
    /// Secret services of this client: id → name.
    private var secrets: [UInt32: String] = [:]
    /// Nonces sent in openData and not yet used: each opens exactly one data channel.
    private var outstandingNonces: Set<TunnelProtocol.Key16> = []
    private var idleChannels: [AsyncDuplex] = []
    private var waiting: [WaitingVisitor] = []
    private var heartbeatTimer: LoopTimer?
    private var lastHeard: UInt64
    private var ended = false
    /// The relays of this client's visitors; they outlive the session.
    private let relays: RelaySet
    private var logger: Logger { server.logger }
    private var loop: EventLoop { server.loop }

    init(server: TunnelServer, control: AsyncDuplex, id: [UInt8], peer: String, sessionKey: [UInt8], poolSize: Int, muxChannels: Int) {
        self.server = server
        self.control = control
        self.id = id
        self.peer = peer
        self.sessionKey = sessionKey
        self.poolSize = poolSize
        self.muxChannels = muxChannels
        lastHeard = server.loop.now
        relays = server.relays.makeSet()
    }

    /// Serves the control channel until it dies; then releases everything the client had.
    func run() async {
        requestChannels()
        scheduleHeartbeat()
        var reason = "control channel closed"
        do {
            while !ended {
                let message = try await TunnelProtocol.read(TunnelProtocol.ClientControl.self, from: control)
                lastHeard = loop.now
                switch message {
                case .registerService(let request): register(request)
                case .registerSecret(let sid, let name): registerSecret(sid, name: name)
                case .visit(let name):
                    try await visit(name)
                    return
                case .ping(let x): control.send(TunnelProtocol.encode(TunnelProtocol.ServerControl.pong(x)))
                case .pong: break
                }
            }
        } catch {
            reason = "\(error)"
        }
        end(reason: reason)
    }

    /// Services of every kind this client registered.
    private var serviceCount: Int { services.count + udpServices.count + secrets.count }

    private func isRegistered(_ id: UInt32) -> Bool {
        services[id] != nil || udpServices[id] != nil || secrets[id] != nil
    }

    private func register(_ request: TunnelProtocol.ServiceRequest) {
        if isRegistered(request.id) {
            return refuse(request, TunnelProtocol.Refusal(.duplicateService, "service id \(request.id) registered twice"))
        }
        guard serviceCount < server.config.maxServicesPerClient else {
            return refuse(request, TunnelProtocol.Refusal(.tooManyServices, "too many services (limit \(server.config.maxServicesPerClient))"))
        }
        switch server.bindService(request) {
        case .failure(let refusal):
            refuse(request, refusal)
        case .success(let listeners) where request.kind == .udp:
            let service = ServerUDPService(id: request.id, loop: loop, logger: logger, batch: server.datagramBatch) { [weak self] lost in
                self?.udpNeedsChannel(lost)
            }
            do {
                try service.start(listeners)
            } catch {
                service.close()
                return refuse(request, TunnelProtocol.Refusal(.listenFailed, "cannot watch UDP port: \(error)"))
            }
            udpServices[request.id] = (service, request.compress)
            control.send(TunnelProtocol.encode(.serviceAccepted(id: request.id, address: listeners[0].1.description)))
            logger.info("service exposed", metadata: ["peer": "\(peer)", "listen": "udp \(service.listen)"])
            udpNeedsChannel(service)
        case .success(let listeners):
            let exposedListeners = Listeners(loop: loop, logger: logger)
            do {
                try exposedListeners.start(listeners.map { (fd: $0.0, address: $0.1) }) { [weak self] fd, visitor in
                    guard let self else { return Net.closeWithReset(fd) }
                    self.visitorArrived(TCPStream(fd: fd, noDelay: false), peer: visitor?.description ?? "?", service: request.id)
                }
            } catch {
                return refuse(request, TunnelProtocol.Refusal(.listenFailed, "cannot watch port \(request.port): \(error)"))
            }
            let exposed = ExposedService(request: request, listeners: exposedListeners)
            services[request.id] = exposed
            control.send(TunnelProtocol.encode(.serviceAccepted(id: request.id, address: listeners[0].1.description)))
            logger.info("service exposed", metadata: ["peer": "\(peer)", "listen": "\(exposed.listen)"])
        }
    }

    private func refuse(_ request: TunnelProtocol.ServiceRequest, _ refusal: TunnelProtocol.Refusal) {
        control.send(TunnelProtocol.encode(.serviceRefused(id: request.id, refusal)))
        logger.warning("service refused", metadata: ["peer": "\(peer)", "port": .stringConvertible(request.port), "reason": "\(refusal.reason)"])
    }

    private func registerSecret(_ sid: UInt32, name: String) {
        let request = TunnelProtocol.ServiceRequest(id: sid, kind: .tcp, bindHost: "", port: 0)
        if isRegistered(sid) {
            return refuse(request, TunnelProtocol.Refusal(.duplicateService, "service id \(sid) registered twice"))
        }
        guard serviceCount < server.config.maxServicesPerClient else {
            return refuse(request, TunnelProtocol.Refusal(.tooManyServices, "too many services (limit \(server.config.maxServicesPerClient))"))
        }
        guard !name.isEmpty, server.secretServices[name] == nil else {
            return refuse(request, TunnelProtocol.Refusal(.nameTaken, "secret service '\(name)' is already registered by another client"))
        }
        secrets[sid] = name
        server.secretServices[name] = (self, sid)
        control.send(TunnelProtocol.encode(.serviceAccepted(id: sid, address: "secret:\(name)")))
        logger.info("secret service registered", metadata: ["peer": "\(peer)", "service": "\(name)"])
    }

    /// This session is a visitor: hand its connection to the secret service's client.
    /// The visitor and that client then prove the service token to each other end to
    /// end; the server only pairs the two connections.
    private func visit(_ name: String) async throws {
        guard let (exposer, sid) = server.secretServices[name], exposer !== self else {
            control.send(TunnelProtocol.encode(TunnelProtocol.VisitAnswer.refused(.init(.noSuchService, "no secret service named '\(name)'"))))
            try? await control.flush()
            logger.warning("visit refused: unknown secret service", metadata: ["peer": "\(peer)", "service": "\(name)"])
            end(reason: "visit refused")
            return
        }
        ended = true
        heartbeatTimer?.cancel()
        heartbeatTimer = nil
        control.send(TunnelProtocol.encode(.visitAccepted))
        try await control.flush()
        logger.info("visitor connected", metadata: ["peer": "\(peer)", "service": "\(name)"])
        exposer.visitorArrived(control.detach(), peer: peer, service: sid)
    }

    // MARK: data channels

    /// Asks the client for enough data channels to cover the pool and every waiting visitor.
    private func requestChannels() {
        guard !ended else { return }
        let carriersWanted = max(0, muxChannels - carriers.count - carriersStarting)
        while idleChannels.count + outstandingNonces.count < poolSize + waiting.count + udpWaiting.count + carriersWanted {
            let nonce = TunnelCrypto.random(TunnelProtocol.channelNonceSize)
            outstandingNonces.insert(TunnelProtocol.Key16(nonce))
            control.send(TunnelProtocol.encode(.openData(channelNonce: nonce)))
        }
    }

    /// Checks a data channel's one-time proof and uses up its nonce.
    func accept(nonce: [UInt8], proof: [UInt8]) -> Bool {
        let key = TunnelProtocol.Key16(nonce)
        guard !ended, outstandingNonces.contains(key) else { return false }
        let expected = TunnelProtocol.dataProof(sessionKey: sessionKey, sessionID: id, channelNonce: nonce)
        guard TunnelCrypto.constantTimeEqual(proof, expected) else { return false }
        outstandingNonces.remove(key)
        return true
    }

    func dataChannelArrived(_ channel: AsyncDuplex) {
        guard !ended else { return channel.close() }
        if carriers.count + carriersStarting < muxChannels {
            makeCarrier(channel)
        } else if !udpWaiting.isEmpty {
            attachUDP(udpWaiting.removeFirst(), channel)
        } else if waiting.isEmpty {
            idleChannels.append(channel)
        } else {
            let visitor = waiting.removeFirst()
            visitor.timer?.cancel()
            pair(channel, visitor.stream, peer: visitor.peer, service: visitor.service)
        }
    }

    // MARK: multiplexed data channels

    /// Turns a fresh data channel into a carrier of multiplexed visitor streams.
    private func makeCarrier(_ channel: AsyncDuplex) {
        channel.send(TunnelProtocol.encode(.mux))
        guard channel.hasPendingOutput else { return startCarrier(channel.detach()) }
        carriersStarting += 1
        Task(executorPreference: loop.tasks) {
            let flushed: Bool
            do {
                try await channel.flush()
                flushed = true
            } catch {
                flushed = false
            }
            self.carriersStarting -= 1
            guard flushed, !self.ended else {
                channel.close()
                return self.requestChannels()
            }
            self.startCarrier(channel.detach())
        }
    }

    private func startCarrier(_ stream: Duplex) {
        let carrier = MuxConnection(loop: loop, carrier: stream, isOpener: true, pipes: relays.resources.pipes)
        carrier.onClose = { [weak self] carrier, error in self?.carrierClosed(carrier, error) }
        do {
            try carrier.start()
        } catch {
            logger.warning("cannot watch a multiplexed data channel", metadata: ["peer": "\(peer)", "error": "\(error)"])
            return requestChannels()
        }
        carriers.append(carrier)
        let queued = muxWaiting
        muxWaiting.removeAll()
        for v in queued {
            v.timer?.cancel()
            openStream(on: carrier, v.stream, peer: v.peer, service: v.service)
        }
    }

    private func carrierClosed(_ carrier: MuxConnection, _ error: Error?) {
        carriers.removeAll { $0 === carrier }
        guard !ended else { return }
        logger.warning("multiplexed data channel lost", metadata: ["peer": "\(peer)", "error": "\(error.map { "\($0)" } ?? "closed")"])
        requestChannels()
    }

    /// The carrier with the fewest streams.
    private func pickCarrier() -> MuxConnection? {
        var best: MuxConnection?
        for c in carriers where !c.isClosed && (best == nil || c.streamCount < best!.streamCount) { best = c }
        return best
    }

    private func openStream(on carrier: MuxConnection, _ visitorStream: Duplex, peer visitor: String, service: UInt32) {
        guard let exposed = services[service],
              let stream = carrier.open(TunnelProtocol.encodeOpen(serviceID: service, visitor: visitor)) else {
            return visitorStream.close(reset: true)
        }
        startRelay(stream, visitorStream, visitor: visitor, listen: exposed.listen, compress: exposed.request.compress)
    }

    private func udpNeedsChannel(_ service: ServerUDPService) {
        guard !ended, udpServices[service.id] != nil else { return }
        if let channel = idleChannels.popLast() {
            attachUDP(service, channel)
        } else {
            udpWaiting.append(service)
        }
        requestChannels()
    }

    /// Dedicates a data channel to a UDP service's datagrams.
    private func attachUDP(_ service: ServerUDPService, _ channel: AsyncDuplex) {
        let compress = udpServices[service.id]?.1 ?? false
        channel.send(TunnelProtocol.encode(.connect(serviceID: service.id, visitor: "udp")))
        Task(executorPreference: loop.tasks) {
            do {
                try await channel.flush()
            } catch {
                return self.udpNeedsChannel(service)
            }
            var stream = channel.detach()
            if compress {
                guard let z = try? ZlibStream(wrapping: stream) else {
                    stream.close(reset: true)
                    return self.udpNeedsChannel(service)
                }
                stream = z
            }
            service.attach(stream)
        }
        requestChannels()
    }

    func visitorArrived(_ stream: Duplex, peer visitor: String, service: UInt32) {
        if muxChannels > 0 && services[service] != nil {
            if let carrier = pickCarrier() {
                return openStream(on: carrier, stream, peer: visitor, service: service)
            }
            muxWaiting.append(makeWaiter(stream, peer: visitor, service: service))
            return requestChannels()
        }
        if let channel = idleChannels.popLast() {
            pair(channel, stream, peer: visitor, service: service)
        } else {
            waiting.append(makeWaiter(stream, peer: visitor, service: service))
        }
        requestChannels()
    }

    private func makeWaiter(_ stream: Duplex, peer visitor: String, service: UInt32) -> WaitingVisitor {
        let waiter = WaitingVisitor(stream: stream, peer: visitor, service: service)
        waiter.timer = loop.schedule(after: server.config.visitorTimeout) { [weak self, unowned waiter] in
            self?.visitorTimedOut(waiter)
        }
        return waiter
    }

    private func visitorTimedOut(_ waiter: WaitingVisitor) {
        if let i = waiting.firstIndex(where: { $0 === waiter }) {
            waiting.remove(at: i)
        } else if let i = muxWaiting.firstIndex(where: { $0 === waiter }) {
            muxWaiting.remove(at: i)
        } else {
            return
        }
        waiter.stream.close(reset: true)
        logger.warning("visitor dropped: no data channel in time", metadata: ["peer": "\(waiter.peer)", "timeout": "\(DurationSpec.format(server.config.visitorTimeout))"])
    }

    /// Tells the client which service the visitor wants, then relays raw bytes. The
    /// frame nearly always fits the socket at once; only when it does not, a task waits.
    private func pair(_ channel: AsyncDuplex, _ visitorStream: Duplex, peer visitor: String, service: UInt32) {
        let listen = services[service]?.listen ?? secrets[service].map { "secret:\($0)" } ?? "?"
        let compress = services[service]?.request.compress ?? false
        channel.send(TunnelProtocol.encode(.connect(serviceID: service, visitor: visitor)))
        guard channel.hasPendingOutput else {
            return startRelay(channel.detach(), visitorStream, visitor: visitor, listen: listen, compress: compress)
        }
        Task(executorPreference: loop.tasks) { [server] in
            do {
                try await channel.flush()
            } catch {
                visitorStream.close(reset: true)
                server.logger.warning("data channel failed before use", metadata: ["peer": "\(visitor)", "error": "\(error)"])
                return
            }
            self.startRelay(channel.detach(), visitorStream, visitor: visitor, listen: listen, compress: compress)
        }
    }

    private func startRelay(_ channel: Duplex, _ visitorStream: Duplex, visitor: String, listen: String, compress: Bool) {
        let server = self.server
        var data = channel
        var zlib: ZlibStream?
        if compress {
            do {
                zlib = try ZlibStream(wrapping: data)
                data = zlib!
            } catch {
                data.close(reset: true)
                visitorStream.close(reset: true)
                return
            }
        }
        relays.start(a: visitorStream, b: data, peer: visitor) { relay, reason in
            // With compression, what crossed the tunnel next to the visitor's bytes.
            let wire: Logger.Metadata = zlib.map {
                ["wire_up": .stringConvertible($0.compressedOut), "wire_down": .stringConvertible($0.compressedIn)]
            } ?? [:]
            server.logger.connectionClosed(peer: visitor, ("listen", listen), relay: relay, reason: reason, extra: wire)
        }
    }

    // MARK: liveness and ending

    private func scheduleHeartbeat() {
        let hb = server.config.heartbeat
        heartbeatTimer = loop.schedule(after: hb.interval) { [weak self] in
            guard let self, !self.ended else { return }
            if self.loop.now &- self.lastHeard > hb.deadAfter.nanoseconds {
                self.control.fail(.timedOut("heartbeat (\(hb.misses) missed)"))
                return
            }
            self.control.send(TunnelProtocol.encode(TunnelProtocol.ServerControl.ping(self.loop.now)))
            self.scheduleHeartbeat()
        }
    }

    /// Closes the exposed ports (for a graceful drain), keeping running relays.
    func stopAccepting() {
        for s in services.values { s.listeners.stop() }
        services.removeAll()
        let udp = udpServices.values.map(\.0)
        udpServices.removeAll()
        udpWaiting.removeAll()
        for s in udp { s.close() }
        for name in secrets.values { server.secretServices[name] = nil }
        secrets.removeAll()
    }

    /// Releases the client's ports, pooled channels and waiting visitors.
    func end(reason: String) {
        guard !ended else { return }
        ended = true
        heartbeatTimer?.cancel()
        heartbeatTimer = nil
        stopAccepting()
        for c in idleChannels { c.close() }
        idleChannels.removeAll()
        for v in waiting + muxWaiting {
            v.timer?.cancel()
            v.stream.close(reset: true)
        }
        waiting.removeAll()
        muxWaiting.removeAll()
        // Visitors already relayed go on, as on dedicated channels; the carriers close
        // when their last stream ends (or when the client's side goes away).
        for c in carriers { c.closeWhenIdle() }
        carriers.removeAll()
        outstandingNonces.removeAll()
        server.relays.retire(relays)
        control.close()
        logger.info("client disconnected", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
    }
}
