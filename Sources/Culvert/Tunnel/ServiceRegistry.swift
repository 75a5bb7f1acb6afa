import Logging
import Reactor
import Synchronization
import Transfer

/// One service a client registered, as every loop sees it: immutable but for
/// `isRetired`, so a visitor can carry it to the loop that relays it.
final class ExposedService: @unchecked Sendable {
    enum Kind {
        /// Public TCP listeners on the session's loop.
        case tcp(Listeners)
        /// Public UDP sockets whose datagrams ride one data channel.
        case udp(ServerUDPService)
        /// No port: reachable only by visitors who know its token.
        case secret(name: String)
    }

    /// The client's id for it, stable for the session.
    let id: UInt32
    /// Unique on this server: names the service's relay set on each loop.
    let key: UInt64
    let kind: Kind
    let compress: Bool
    /// How close lines name it: the bound addresses, or `secret:NAME`.
    let listen: String
    /// The public port it holds in the session directory; nil for a secret service.
    let port: SessionDirectory.Port?
    private let retired = Atomic<Bool>(false)

    init(id: UInt32, key: UInt64, kind: Kind, compress: Bool, listen: String, port: SessionDirectory.Port?) {
        self.id = id
        self.key = key
        self.kind = kind
        self.compress = compress
        self.listen = listen
        self.port = port
    }

    /// Gone from its session: no new visitors; running relays go on.
    var isRetired: Bool { retired.load(ordering: .relaxed) }
    fileprivate func retire() { retired.store(true, ordering: .relaxed) }
}

/// The services of one session: their stable ids (the client's), their kinds and what
/// each owns (listeners, UDP sockets, a secret name in the directory), under the
/// server's port policy and per-client limit. Visitors it accepts go to `onVisitor`.
///
/// Thread confinement: lives on the session's loop.
final class ServiceRegistry {
    private let home: ServerLoop
    private let context: ServerContext
    private let peer: String
    private var services: [UInt32: ExposedService] = [:]
    /// A visitor accepted on a TCP service's port.
    var onVisitor: (Duplex, String, ExposedService) -> Void = { stream, _, _ in stream.close(reset: true) }
    /// A UDP service has no data channel (new, or its channel was lost).
    var onUDPNeedsChannel: (ExposedService, ServerUDPService) -> Void = { _, _ in }
    private var logger: Logger { context.logger }

    init(home: ServerLoop, context: ServerContext, peer: String) {
        self.home = home
        self.context = context
        self.peer = peer
    }

    subscript(id: UInt32) -> ExposedService? { services[id] }

    /// Binds and watches a TCP or UDP service's ports for `session`; the bound address, or why not.
    func register(_ request: TunnelProtocol.ServiceRequest, session: SessionDirectory.Entry) -> Result<String, TunnelProtocol.Refusal> {
        home.loop.assertInLoop()
        if let refusal = checkNew(request.id) { return .failure(refusal) }
        let bound: [(Int32, SocketAddress)]
        switch context.reloadable.policy.bind(request) {
        case .failure(let refusal): return .failure(refusal)
        case .success(let sockets): bound = sockets
        }
        let key = context.nextServiceKey()
        let port = SessionDirectory.Port(udp: request.kind == .udp, number: bound[0].1.port)
        switch request.kind {
        case .udp:
            // Weak both ways round: the service holds the UDP sockets, whose callback
            // must not keep the service alive once the session lets go of it.
            weak var service: ExposedService?
            let ports = bound.map { "\($0.1)" }
            let meter = home.meters.service(ports.joined(separator: ","), kind: "udp")
            meter.ports = ports
            let udp = ServerUDPService(id: request.id, loop: home.loop, logger: logger, batch: home.datagramBatch, meter: meter) { [weak self] lost in
                guard let self, let service, self.services[service.id] === service else { return }
                self.onUDPNeedsChannel(service, lost)
            }
            do {
                try udp.start(bound)
            } catch {
                udp.close()
                return .failure(.init(.listenFailed, "cannot watch UDP port: \(error)"))
            }
            let registered = ExposedService(id: request.id, key: key, kind: .udp(udp), compress: request.compress, listen: udp.listen, port: port)
            service = registered
            services[request.id] = registered
            logger.info("service exposed", metadata: ["peer": "\(peer)", "listen": "udp \(udp.listen)"])
            onUDPNeedsChannel(registered, udp)
        case .tcp:
            let listeners = Listeners(loop: home.loop, logger: logger, refusals: context.refusals)
            var service: ExposedService?
            do {
                try listeners.start(bound.map { (fd: $0.0, address: $0.1) }) { [weak self] fd, visitor in
                    guard let self, let service, !service.isRetired else { return Net.closeWithReset(fd) }
                    if self.context.config.acceptProxy { return self.readProxyHeader(fd, visitor: visitor, service: service) }
                    self.onVisitor(TCPStream(fd: fd, noDelay: false), visitor?.description ?? "?", service)
                }
            } catch {
                return .failure(.init(.listenFailed, "cannot watch port \(request.port): \(error)"))
            }
            let listen = listeners.addresses.map(\.description).joined(separator: ",")
            let registered = ExposedService(id: request.id, key: key, kind: .tcp(listeners), compress: request.compress, listen: listen, port: port)
            service = registered
            services[request.id] = registered
            logger.info("service exposed", metadata: ["peer": "\(peer)", "listen": "\(listen)"])
        }
        context.directory.claimPort(port, by: session)
        return .success(bound[0].1.description)
    }

    /// `--accept-proxy`: the visitor's first bytes must be a PROXY header, whose source
    /// then stands for the visitor everywhere (logs, the address the client is told).
    /// The reader holds only the socket, for at most the handshake timeout.
    private func readProxyHeader(_ fd: Int32, visitor: SocketAddress?, service: ExposedService) {
        let reader = ProxyHeaderReader(loop: home.loop, fd: fd, timeout: context.config.handshakeTimeout) { [weak self] outcome in
            switch outcome {
            case .success(let header):
                guard let self, !service.isRetired else { return Net.closeWithReset(fd) }
                self.onVisitor(TCPStream(fd: fd, noDelay: false), (header.source ?? visitor).logDescription, service)
            case .failure(let error):
                Net.closeWithReset(fd)
                guard let self, self.context.refusals.record(error.label) else { return }
                self.logger.warning("visitor refused: bad PROXY header", metadata: [
                    "peer": "\(visitor.logDescription)", "listen": "\(service.listen)", "reason": "\(error.label)", "error": "\(error)"])
            }
        }
        reader.start()
    }

    /// Claims a secret service's name for `session` in the server's directory.
    func registerSecret(_ id: UInt32, name: String, session: SessionDirectory.Entry) -> Result<String, TunnelProtocol.Refusal> {
        home.loop.assertInLoop()
        if let refusal = checkNew(id) { return .failure(refusal) }
        let service = ExposedService(id: id, key: context.nextServiceKey(), kind: .secret(name: name), compress: false, listen: "secret:\(name)", port: nil)
        guard !name.isEmpty, context.directory.claimSecret(name, by: session, serviceID: id) else {
            return .failure(.init(.nameTaken, "secret service '\(name)' is already registered by another client"))
        }
        services[id] = service
        logger.info("secret service registered", metadata: ["peer": "\(peer)", "service": "\(name)"])
        return .success("secret:\(name)")
    }

    private func checkNew(_ id: UInt32) -> TunnelProtocol.Refusal? {
        if context.draining.load(ordering: .relaxed) { return .init(.serverFull, "the server is shutting down") }
        if services[id] != nil { return .init(.duplicateService, "service id \(id) registered twice") }
        let limit = context.reloadable.maxServicesPerClient
        if services.count >= limit { return .init(.tooManyServices, "too many services (limit \(limit))") }
        return nil
    }

    /// Closes every port and releases every name (a drain, or the session's end); relays
    /// already running go on, each loop's set of a service leaving once it is idle.
    func closeAll(session: ServerSession) {
        home.loop.assertInLoop()
        for service in services.values { close(service, session: session) }
        services.removeAll()
    }

    /// The client removed one service (a reload): as `closeAll` for that one; an id
    /// not registered is ignored, as the client may remove one the server refused.
    func unregister(_ id: UInt32, session: ServerSession) {
        home.loop.assertInLoop()
        guard let service = services.removeValue(forKey: id) else { return }
        close(service, session: session)
        logger.info("service removed", metadata: ["peer": "\(peer)", "listen": "\(service.listen)"])
    }

    private func close(_ service: ExposedService, session: ServerSession) {
        service.retire()
        switch service.kind {
        case .tcp(let listeners): listeners.stop()
        case .udp(let udp): udp.close()
        case .secret(let name): context.directory.releaseSecret(name, by: session)
        }
        if let port = service.port { context.directory.releasePort(port, by: session) }
        for l in context.loops { l.run { l.retire(service) } }
    }
}
