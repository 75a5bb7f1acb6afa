import Logging
import Reactor
import Transfer

/// One authenticated control session of the client: registers the services, opens the
/// data channels the server asks for, and answers heartbeats.
///
/// Thread confinement: lives on the client's loop.
final class ClientSession {
    private unowned let client: TunnelClient
    private let control: AsyncDuplex
    private let id: [UInt8]
    private let key: [UInt8]
    /// Data channels opened and waiting for a visitor.
    private var pooled: [ObjectIdentifier: AsyncDuplex] = [:]
    /// Local service addresses resolved so far, by service id.
    private var resolvedLocal: [UInt32: [SocketAddress]] = [:]
    /// `host:port` of each service's local end, for close lines.
    private lazy var localNames: [String] = client.config.services.map(\.localDescription)
    /// Data channels carrying multiplexed TCP visitors.
    private var carriers: [ObjectIdentifier: MuxConnection] = [:]
    /// Local connections being made for multiplexed visitors.
    private var connecting: [ObjectIdentifier: Connector] = [:]
    /// The relays of this session's visitors; they outlive the session.
    private let relays: RelaySet
    /// Data channels carrying UDP services.
    private var udpRelays: [ObjectIdentifier: ClientUDPRelay] = [:]
    private var heartbeatTimer: LoopTimer?
    private var retryTimers: [LoopTimer] = []
    private var lastHeard: UInt64
    private var ended = false
    private var logger: Logger { client.logger }
    private var loop: EventLoop { client.loop }
    /// Seconds between retries of a service the server refused after a reconnect.
    private static let registrationRetry: Duration = .seconds(5)

    init(client: TunnelClient, control: AsyncDuplex, id: [UInt8], key: [UInt8]) {
        self.client = client
        self.control = control
        self.id = id
        self.key = key
        lastHeard = client.loop.now
        relays = client.relays.makeSet()
    }

    /// Serves the control channel until it dies. Throws `FatalClientError` when a
    /// service is refused on the first session.
    func run(firstSession: Bool) async throws {
        let services = client.config.services
        for (i, spec) in services.enumerated() { register(spec, id: UInt32(i)) }
        scheduleHeartbeat()
        defer { end() }
        do {
            while !ended {
                let message = try await TunnelProtocol.read(TunnelProtocol.ServerControl.self, from: control)
                lastHeard = loop.now
                switch message {
                case .serviceAccepted(let sid, let address):
                    guard Int(sid) < services.count else { continue }
                    client.serviceExposed(services[Int(sid)], id: sid, address: address)
                case .serviceRefused(let sid, let refusal):
                    guard Int(sid) < services.count else { continue }
                    let spec = services[Int(sid)]
                    try client.serviceRefused(spec, reason: refusal.reason, firstSession: firstSession)
                    retryTimers.append(loop.schedule(after: Self.registrationRetry) { [weak self] in
                        self?.register(spec, id: sid)
                    })
                case .openData(let nonce):
                    Task(executorPreference: loop.tasks) { await self.openDataChannel(nonce: nonce) }
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

    private func register(_ spec: ServiceSpec, id sid: UInt32) {
        guard !ended else { return }
        if spec.isSecret {
            control.send(TunnelProtocol.encode(.registerSecret(id: sid, name: spec.name)))
        } else {
            control.send(TunnelProtocol.encode(.registerService(TunnelProtocol.ServiceRequest(
                id: sid, kind: spec.isUDP ? .udp : .tcp, bindHost: spec.bindHost ?? "", port: spec.remotePort, compress: spec.compress))))
        }
    }

    /// Opens one data channel for the server's nonce, waits in the pool until the server
    /// sends a visitor, then connects to the local service and relays.
    private func openDataChannel(nonce: [UInt8]) async {
        let channel: AsyncDuplex
        do {
            channel = try await client.openChannel()
        } catch {
            logger.warning("cannot open data channel", metadata: ["error": "\(error)"])
            return
        }
        guard !ended else { return channel.close() }
        let key = ObjectIdentifier(channel)
        pooled[key] = channel
        defer { pooled[key] = nil }
        let serviceID: UInt32
        let visitor: String
        do {
            channel.send(TunnelProtocol.encode(.dataHello(
                version: TunnelProtocol.version, sessionID: id, channelNonce: nonce,
                proof: TunnelProtocol.dataProof(sessionKey: self.key, sessionID: id, channelNonce: nonce))))
            switch try await TunnelProtocol.read(TunnelProtocol.DataCommand.self, from: channel) {
            case .connect(let sid, let who):
                serviceID = sid
                visitor = who
            case .mux:
                return startCarrier(channel.detach())
            }
        } catch {
            if !ended && error as? ChannelError != .closed {
                logger.debug("pooled data channel closed", metadata: ["error": "\(error)"])
            }
            channel.fail(.closed)
            return
        }
        let services = client.config.services
        guard Int(serviceID) < services.count else {
            return channel.fail(.protocolViolation("unknown service \(serviceID)"))
        }
        let spec = services[Int(serviceID)]
        if spec.isUDP { return await startUDPRelay(channel, spec: spec) }
        if spec.isSecret {
            // The visitor must prove the service token before anything local is touched.
            do {
                let key = TunnelProtocol.secretKey(serviceToken: spec.serviceToken ?? client.config.token, name: spec.name)
                try await challengeVisitor(channel, spec: spec, key: key)
            } catch {
                logger.warning("visitor refused", metadata: ["peer": "\(visitor)", "service": "\(spec.name)", "error": "\(error)"])
                return
            }
        }
        let localFD: Int32
        do {
            localFD = try await Connector.connect(to: try await localAddresses(of: serviceID, spec),
                                                  timeout: client.config.connectTimeout, on: loop)
        } catch {
            logger.warning("local service unreachable", metadata: ["peer": "\(visitor)", "target": "\(spec.localDescription)", "error": "\(error)"])
            if spec.isSecret {
                channel.send(TunnelProtocol.encode(TunnelProtocol.VisitAnswer.refused(.init(.localUnreachable, "local service unreachable"))))
                try? await channel.flush()
            }
            return channel.fail(.closed)
        }
        if spec.isSecret {
            channel.send(TunnelProtocol.encode(.serviceReady))
            do {
                try await channel.flush()
            } catch {
                Posix.close(localFD)
                return channel.fail(.closed)
            }
        }
        guard let data = wrap(channel.detach(), compress: spec.compress) else { return Posix.close(localFD) }
        startRelay(data, localFD: localFD, visitor: visitor, target: localNames[Int(serviceID)])
    }

    // MARK: multiplexed data channels

    private func startCarrier(_ stream: Duplex) {
        guard !ended else { return stream.close(reset: false) }
        let carrier = MuxConnection(loop: loop, carrier: stream, isOpener: false, pipes: relays.resources.pipes)
        carrier.onOpen = { [weak self] stream, payload in
            guard let self else { return stream.close(reset: true) }
            self.streamOpened(stream, payload)
        }
        carrier.onClose = { [weak self] carrier, error in
            guard let self else { return }
            self.carriers[ObjectIdentifier(carrier)] = nil
            if !self.ended, let error {
                self.logger.warning("multiplexed data channel lost", metadata: ["error": "\(error)"])
            }
        }
        do {
            try carrier.start()
        } catch {
            return logger.warning("cannot watch a multiplexed data channel", metadata: ["error": "\(error)"])
        }
        carriers[ObjectIdentifier(carrier)] = carrier
    }

    /// A visitor arrived on a carrier: connect to its local service and relay.
    private func streamOpened(_ stream: MuxStream, _ payload: UnsafeRawBufferPointer) {
        let services = client.config.services
        let serviceID: UInt32
        let visitor: String
        do {
            (serviceID, visitor) = try TunnelProtocol.decodeOpen(payload)
        } catch {
            logger.warning("malformed stream on a multiplexed data channel", metadata: ["error": "\(error)"])
            return stream.close(reset: true)
        }
        guard Int(serviceID) < services.count, !services[Int(serviceID)].isUDP, !services[Int(serviceID)].isSecret else {
            logger.warning("multiplexed stream for an unknown service", metadata: ["service": .stringConvertible(serviceID)])
            return stream.close(reset: true)
        }
        let spec = services[Int(serviceID)]
        if let addresses = resolvedLocal[serviceID] {
            return dial(stream, serviceID: serviceID, spec: spec, visitor: visitor, addresses: addresses)
        }
        Task(executorPreference: loop.tasks) {
            do {
                let addresses = try await self.localAddresses(of: serviceID, spec)
                self.dial(stream, serviceID: serviceID, spec: spec, visitor: visitor, addresses: addresses)
            } catch {
                self.logger.warning("local service unreachable", metadata: ["peer": "\(visitor)", "target": "\(spec.localDescription)", "error": "\(error)"])
                stream.close(reset: true)
            }
        }
    }

    /// Connects a multiplexed visitor to its local service (callbacks on the loop, no
    /// task per visitor), then relays.
    private func dial(_ stream: MuxStream, serviceID: UInt32, spec: ServiceSpec, visitor: String, addresses: [SocketAddress]) {
        guard !ended else { return stream.close(reset: true) }
        let connector = Connector(loop: loop, addresses: addresses, timeout: client.config.connectTimeout) { [weak self] connector, outcome in
            guard let self else { return stream.close(reset: true) }
            self.connecting[ObjectIdentifier(connector)] = nil
            switch outcome {
            case .connected(let fd, let registration, _):
                guard let data = self.wrap(stream, compress: spec.compress) else {
                    if let registration { self.loop.forget(registration: registration) }
                    return Posix.close(fd)
                }
                self.startRelay(data, localFD: fd, adopting: registration, visitor: visitor, target: self.localNames[Int(serviceID)])
            case .exhausted(_, let lastError):
                self.logger.warning("local service unreachable", metadata: ["peer": "\(visitor)", "target": "\(spec.localDescription)", "error": "\(lastError.map { "\($0)" } ?? "no address")"])
                stream.close(reset: true)
            case .cancelled:
                stream.close(reset: true)
            }
        }
        connecting[ObjectIdentifier(connector)] = connector
        connector.start()
    }

    /// The exposer's half of the end-to-end service-token proof. On a wrong proof the
    /// visitor is told so and the channel closed.
    private func challengeVisitor(_ channel: AsyncDuplex, spec: ServiceSpec, key: [UInt8]) async throws {
        let timer = loop.schedule(after: client.config.handshakeTimeout) { channel.fail(.timedOut("visitor handshake")) }
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

    /// A UDP service's data channel: per-visitor sessions to the local service until the
    /// channel closes (the server then asks for a new one).
    private func startUDPRelay(_ channel: AsyncDuplex, spec: ServiceSpec) async {
        let target: [SocketAddress]
        do {
            target = try await Resolver.resolve(host: spec.localHost, port: spec.localPort, passive: false, on: loop)
        } catch {
            logger.warning("local service unreachable", metadata: ["target": "\(spec.localDescription)", "error": "\(error)"])
            return channel.fail(.closed)
        }
        guard let data = wrap(channel.detach(), compress: spec.compress) else { return }
        let relay = ClientUDPRelay(loop: loop, logger: logger, stream: data, target: target,
                                   idleTimeout: client.config.udpIdleTimeout) { [weak self] relay in
            self?.udpRelays[ObjectIdentifier(relay)] = nil
        }
        udpRelays[ObjectIdentifier(relay)] = relay
        do {
            try relay.start()
        } catch {
            relay.closeAll()
        }
    }

    /// A service's local addresses, resolved once per session (off-loop for names).
    private func localAddresses(of id: UInt32, _ spec: ServiceSpec) async throws -> [SocketAddress] {
        if let known = resolvedLocal[id] { return known }
        let addresses = try await Resolver.resolve(host: spec.localHost, port: spec.localPort, passive: false, on: loop)
        resolvedLocal[id] = addresses
        return addresses
    }

    private func startRelay(_ data: Duplex, localFD: Int32, adopting registration: Registration? = nil, visitor: String, target: String) {
        let logger = self.logger
        relays.start(a: data, b: TCPStream(fd: localFD), adopting: registration, peer: visitor) { relay, reason in
            logger.connectionClosed(peer: visitor, ("target", target), relay: relay, reason: reason)
        }
    }

    private func scheduleHeartbeat() {
        let hb = client.config.heartbeat
        heartbeatTimer = loop.schedule(after: hb.interval) { [weak self] in
            guard let self, !self.ended else { return }
            if self.loop.now &- self.lastHeard > hb.deadAfter.nanoseconds {
                self.logger.warning("server stopped answering", metadata: ["missed": .stringConvertible(hb.misses)])
                self.control.fail(.timedOut("heartbeat"))
                return
            }
            self.control.send(TunnelProtocol.encode(TunnelProtocol.ClientControl.ping(self.loop.now)))
            self.scheduleHeartbeat()
        }
    }

    /// Closes the control channel and every pooled data channel; running relays go on.
    func end() {
        guard !ended else { return }
        ended = true
        heartbeatTimer?.cancel()
        heartbeatTimer = nil
        for t in retryTimers { t.cancel() }
        retryTimers.removeAll()
        for c in pooled.values { c.fail(.closed) }
        pooled.removeAll()
        for c in Array(connecting.values) { c.cancel() }
        connecting.removeAll()
        // Visitors already relayed go on (a drain waits for them); each carrier closes
        // when its last stream ends (the loop keeps it alive while it is registered).
        for c in Array(carriers.values) { c.closeWhenIdle() }
        carriers.removeAll()
        for r in Array(udpRelays.values) { r.closeAll() }
        client.relays.retire(relays)
        control.close()
    }
}
