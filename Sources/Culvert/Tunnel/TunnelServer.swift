#if canImport(Glibc)
import Glibc
#endif
import Logging
import Reactor
import Transfer

/// `culvert server`: accepts tunnel clients, authenticates them, exposes their services
/// on public ports and pairs each visitor with a data channel from its client.
///
/// Every connection of the tunnel lives on the main loop: control channels, data
/// channels and visitors pair up without crossing threads. (One loop moves several
/// Gbit/s with splice; spreading sessions over loops is a later step.)
///
/// Thread confinement: everything runs on `loop`.
public final class TunnelServer: DrainableService, @unchecked Sendable {
    let config: TunnelServerConfig
    let loop: EventLoop
    let logger: Logger
    let keys: TokenKeys
    private let transport: any Transport
    /// Every visitor relay of every session on `loop`.
    let relays: RelayGroup
    private let listeners: Listeners
    private var sessions: [TunnelProtocol.Key16: ServerSession] = [:]
    /// One datagram batch for every UDP service of the server (they share the loop).
    let datagramBatch = DatagramBatch()
    /// Secret services by name: the session that registered each and its service id.
    var secretServices: [String: (ServerSession, UInt32)] = [:]
    private var unauthenticated = 0
    private var draining = false
    public private(set) var boundAddresses: [SocketAddress] = []

    private init(config: TunnelServerConfig, loop: EventLoop, logger: Logger, transport: any Transport) {
        self.config = config
        self.loop = loop
        self.logger = logger
        self.transport = transport
        keys = TokenKeys(token: config.token)
        relays = RelayGroup(loop: loop, logger: logger)
        listeners = Listeners(loop: loop, logger: logger)
    }

    public static func start(config: TunnelServerConfig, group: LoopGroup, logger: Logger) async throws -> TunnelServer {
        let loop = group.main
        let keys = TokenKeys(token: config.token)
        let transport = try config.transport.implementation.init(server: config, keys: keys)
        let server = TunnelServer(config: config, loop: loop, logger: logger, transport: transport)
        var bound: [(fd: Int32, address: SocketAddress)] = []
        do {
            for spec in config.listen {
                bound += try await Listeners.bind(spec, on: loop, reusePort: false)
            }
        } catch {
            for (fd, _) in bound { Posix.close(fd) }
            throw error
        }
        try server.listeners.start(bound) { [unowned server] fd, peer in server.accepted(fd, peer: peer) }
        server.boundAddresses = server.listeners.addresses
        for address in server.boundAddresses {
            ReadyLine.print("listening tunnel \(address)")
        }
        if let warning = transport.warning {
            logger.warning("\(warning)")
        }
        return server
    }

    // MARK: new connections

    private func accepted(_ fd: Int32, peer: SocketAddress?) {
        let peerText = peer?.description ?? "?"
        guard unauthenticated < config.maxUnauthenticated, !draining else {
            Net.closeWithReset(fd)
            logger.warning("connection refused: too many unauthenticated connections",
                           metadata: ["peer": "\(peerText)", "max": .stringConvertible(config.maxUnauthenticated)])
            return
        }
        unauthenticated += 1
        Task(executorPreference: loop.tasks) { await self.handshake(fd: fd, peer: peerText) }
    }

    /// Reads the first frame of a new connection (after the transport's handshake) and
    /// hands it to the control or data-channel path; the whole exchange must finish
    /// within the handshake timeout.
    private func handshake(fd: Int32, peer: String) async {
        let channel: AsyncDuplex
        let transportHandshake: Transport.Handshake
        do {
            (channel, transportHandshake) = try transport.channel(fd, on: loop)
        } catch {
            unauthenticated -= 1
            logger.warning("cannot set up connection", metadata: ["peer": "\(peer)", "error": "\(error)"])
            return
        }
        let timer = loop.schedule(after: config.handshakeTimeout) {
            channel.fail(.timedOut("handshake"))
        }
        var counted = true
        defer {
            timer.cancel()
            if counted { unauthenticated -= 1 }
        }
        do {
            try await transportHandshake(channel)
            switch try await TunnelProtocol.read(TunnelProtocol.Hello.self, from: channel) {
            case .controlHello(let version, let clientNonce):
                guard let session = try await authenticateControl(channel, peer: peer, version: version, clientNonce: clientNonce) else { return }
                timer.cancel()
                counted = false
                unauthenticated -= 1
                await session.run()
                sessions[TunnelProtocol.Key16(session.id)] = nil
            case .dataHello(let version, let sessionID, let nonce, let proof):
                guard version == TunnelProtocol.version,
                      let session = sessions[TunnelProtocol.Key16(sessionID)], session.accept(nonce: nonce, proof: proof) else {
                    logger.warning("data channel rejected: unknown session, used nonce or bad proof", metadata: ["peer": "\(peer)"])
                    channel.fail(.protocolViolation("data channel rejected"))
                    return
                }
                session.dataChannelArrived(channel)
            }
        } catch {
            logger.warning("handshake failed", metadata: ["peer": "\(peer)", "error": "\(error)"])
            channel.fail(error as? ChannelError ?? .closed)
        }
    }

    /// The mutual proof exchange; nil (connection closed) when the client fails it.
    private func authenticateControl(_ channel: AsyncDuplex, peer: String, version: UInt16, clientNonce: [UInt8]) async throws -> ServerSession? {
        guard version == TunnelProtocol.version else {
            channel.send(TunnelProtocol.encode(TunnelProtocol.ServerHandshake.refused(
                .init(.version, "unsupported protocol version \(version); this server speaks \(TunnelProtocol.version)"))))
            try? await channel.flush()
            channel.close()
            logger.warning("client refused: protocol version", metadata: ["peer": "\(peer)", "version": .stringConvertible(version)])
            return nil
        }
        let serverNonce = TunnelCrypto.random(TunnelProtocol.nonceSize)
        channel.send(TunnelProtocol.encode(.challenge(
            version: TunnelProtocol.version, serverNonce: serverNonce,
            serverProof: TunnelProtocol.serverProof(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce))))
        let auth = try await TunnelProtocol.read(TunnelProtocol.ClientAuth.self, from: channel)
        let expected = TunnelProtocol.clientProof(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce)
        guard TunnelCrypto.constantTimeEqual(auth.clientProof, expected) else {
            logger.warning("authentication failed", metadata: ["peer": "\(peer)"])
            channel.send(TunnelProtocol.encode(TunnelProtocol.ServerHandshake.refused(.init(.authFailed, "authentication failed"))))
            try? await channel.flush()
            channel.close()
            return nil
        }
        guard sessions.count < config.maxClients, !draining else {
            channel.send(TunnelProtocol.encode(TunnelProtocol.ServerHandshake.refused(
                .init(.serverFull, "server full: \(config.maxClients) clients connected"))))
            try? await channel.flush()
            channel.close()
            logger.warning("client refused: limit reached", metadata: ["peer": "\(peer)", "max": .stringConvertible(config.maxClients)])
            return nil
        }
        let id = TunnelCrypto.random(TunnelProtocol.sessionIDSize)
        let session = ServerSession(
            server: self, control: channel, id: id, peer: peer,
            sessionKey: TunnelProtocol.sessionKey(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce),
            poolSize: min(Int(auth.poolSize), 64), muxChannels: min(Int(auth.muxChannels), TunnelProtocol.maxMuxChannels))
        sessions[TunnelProtocol.Key16(id)] = session
        channel.send(TunnelProtocol.encode(.welcome(sessionID: id)))
        logger.info("client connected", metadata: ["peer": "\(peer)"])
        return session
    }

    // MARK: policy

    /// Binds the listeners for a service request, or says why not. Without a BIND (and
    /// without --bind-addr) a service listens on every address, IPv4 and IPv6, on one port.
    func bindService(_ request: TunnelProtocol.ServiceRequest) -> Result<[(Int32, SocketAddress)], TunnelProtocol.Refusal> {
        let wildcard = request.bindHost.isEmpty && config.bindAddresses.isEmpty
        let hosts = wildcard ? ["0.0.0.0", "::"] : [request.bindHost.isEmpty ? config.bindAddresses[0] : request.bindHost]
        if !config.bindAddresses.isEmpty && !config.bindAddresses.contains(hosts[0]) {
            return .failure(TunnelProtocol.Refusal(.bindNotAllowed, "bind address \(hosts[0]) is not allowed (allowed: \(config.bindAddresses.joined(separator: ",")))"))
        }
        var bases: [SocketAddress] = []
        for host in hosts {
            guard let base = SocketAddress(numericHost: host, port: 0) else {
                return .failure(TunnelProtocol.Refusal(.bindNotAllowed, "bind address '\(host)' is not a numeric IP address"))
            }
            bases.append(base)
        }
        let ports: [UInt16]
        if request.port != 0 {
            guard config.allowPorts.contains(request.port) else {
                return .failure(TunnelProtocol.Refusal(.portNotAllowed, "port \(request.port) is not allowed (allowed: \(config.allowPorts))"))
            }
            ports = [request.port]
        } else {
            let candidates = Array(config.allowPorts.ranges.flatMap { $0 }.shuffled().prefix(256))
            ports = config.allowPorts.coversEphemeralRange ? [0] + candidates : candidates
        }
        let udp = request.kind == .udp
        var lastError: SystemError?
        for port in ports {
            switch bindAll(bases, port: port, ipv6Optional: wildcard, udp: udp) {
            case .success(let bound): return .success(bound)
            case .failure(let error): lastError = error
            }
        }
        if request.port != 0, let lastError {
            return .failure(lastError.errno == EADDRINUSE
                ? TunnelProtocol.Refusal(.portInUse, "port \(request.port) is already in use")
                : TunnelProtocol.Refusal(.listenFailed, "cannot listen on port \(request.port): \(lastError)"))
        }
        return .failure(TunnelProtocol.Refusal(.noFreePort, "no free port in the allowed ranges (\(config.allowPorts))"))
    }

    /// Listens on every base address with one port (0: the kernel's choice for the
    /// first, then the same for the rest); all or nothing.
    private func bindAll(_ bases: [SocketAddress], port: UInt16, ipv6Optional: Bool, udp: Bool) -> Result<[(Int32, SocketAddress)], SystemError> {
        var bound: [(Int32, SocketAddress)] = []
        var chosen = port
        for base in bases {
            do throws(SystemError) {
                let fd = udp ? try Net.udpListen(base.withPort(chosen), reusePort: false, bufferSize: 4 << 20)
                             : try Net.listen(base.withPort(chosen), reusePort: false)
                let address: SocketAddress
                do { address = try Net.localAddress(fd) } catch { Posix.close(fd); throw error }
                chosen = address.port
                bound.append((fd, address))
            } catch where ipv6Optional && base.family == AF_INET6 && (error.errno == EAFNOSUPPORT || error.errno == EADDRNOTAVAIL) {
                continue  // no IPv6 on this host: IPv4 alone
            } catch {
                for (fd, _) in bound { Posix.close(fd) }
                return .failure(error)
            }
        }
        return .success(bound)
    }

    // MARK: draining

    public func drain(timeout: Duration) async {
        draining = true
        logger.notice("draining", metadata: ["connections": .stringConvertible(relays.count), "clients": .stringConvertible(sessions.count)])
        listeners.stop()
        for s in Array(sessions.values) { s.stopAccepting() }
        await relays.drain(timeout: timeout)
        for s in Array(sessions.values) { s.end(reason: "server shutting down") }
    }
}
