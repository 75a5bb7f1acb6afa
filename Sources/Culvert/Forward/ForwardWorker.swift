#if canImport(Glibc)
import Glibc
#endif
import Logging
import Reactor
import Transfer

/// The part of a TCP forwarder that lives on one event loop: its listeners, the clients
/// being connected to a target, and the running relays. Nothing here is shared with
/// other loops except the forwarder's atomic counters and target health.
///
/// Thread confinement: every method runs on `loop`.
final class ForwardWorker: ServiceShare {
    let loop: EventLoop
    private unowned let forwarder: TCPForwarder
    // The forwarder's immutable parts the connection path reads, held here: each read
    // through the unowned reference above is a strong retain and release.
    private let config: TCPForwardConfig
    private let targets: TargetSet
    private let webSocket: WebSocketLayers?
    private let logger: Logger
    private let relays: RelaySet
    private let listeners: Listeners
    private var lastLimitLog: UInt64 = 0
    let meters: LoopMeters
    private let meter: ServiceMeter

    init(loop: EventLoop, forwarder: TCPForwarder) {
        self.loop = loop
        self.forwarder = forwarder
        config = forwarder.config
        targets = forwarder.targets
        webSocket = forwarder.webSocket
        logger = forwarder.logger
        relays = RelaySet(loop: loop, resources: LoopResources(), logger: forwarder.logger)
        listeners = Listeners(loop: loop, logger: logger)
        meters = LoopMeters(loop: loop)
        meter = meters.service(forwarder.serviceName, kind: "tcp")
        meter.watch(relays)
    }

    func startAccepting(listeners bound: [(fd: Int32, address: SocketAddress)]) {
        do {
            try listeners.start(bound) { [unowned self] fd, peer in accepted(fd, peer: peer) }
        } catch {
            logger.error("cannot watch listener", metadata: ["listen": "\(bound.map { "\($0.address)" }.joined(separator: ","))", "error": "\(error)"])
        }
    }

    private func accepted(_ fd: Int32, peer: SocketAddress?) {
        // Addresses are formatted only when a line is logged: most connections log nothing
        // below info, and inet_ntop plus string building per connection adds up.
        guard forwarder.admit() else {
            Net.closeWithReset(fd)
            meter.count(result: "refused")
            if loop.now &- lastLimitLog >= 1_000_000_000 {
                lastLimitLog = loop.now
                logger.warning("connection refused: limit reached",
                    metadata: ["peer": "\(peer.logDescription)", "max": .stringConvertible(config.maxConnections), "reason": "limit"])
            }
            return
        }
        if config.acceptProxy { return readProxyHeader(fd, peer: peer) }
        admitted(fd, peer: peer, origin: nil)
    }

    /// `--accept-proxy`: the client's first bytes must be a PROXY header, whose source
    /// is the client from here on (logs, the header we send on). Anything else closes the
    /// connection before a target is dialled.
    private func readProxyHeader(_ fd: Int32, peer: SocketAddress?) {
        var pending: RelaySet.Pending?
        let reader = ProxyHeaderReader(loop: loop, fd: fd, timeout: config.proxyHeaderTimeout) { [unowned self] outcome in
            if let pending { relays.remove(pending: pending) }
            switch outcome {
            case .success(let header):
                admitted(fd, peer: header.source ?? peer, origin: header)
            case .failure(let error):
                Net.closeWithReset(fd)
                forwarder.release()
                guard error != .cancelled else { return meter.count(result: CloseReason.drainTimeout.label) }
                meter.count(result: "refused")
                guard forwarder.proxyRefusals.record(error.label) else { return }
                logger.warning("connection refused: bad PROXY header", metadata: [
                    "peer": "\(peer.logDescription)", "reason": "\(error.label)", "error": "\(error)"])
            }
        }
        pending = relays.add(pending: reader.cancel)
        reader.start()
    }

    /// A client taken in (past the limit and any PROXY header); `origin` is the header it
    /// sent, nil without `--accept-proxy`.
    private func admitted(_ fd: Int32, peer: SocketAddress?, origin: ProxyHeader?) {
        let outgoing = config.sendProxy.map { ($0, origin ?? Self.origin(of: fd, peer: peer)) }
        if let layers = webSocket, layers.ingress != nil {
            return acceptUpgrade(fd, peer: peer, layers: layers, proxyHeader: outgoing)
        }
        dial(client: TCPStream(fd: fd, noDelay: false), peer: peer, proxyHeader: outgoing)
    }

    /// Who the client is and which address it reached, for the header we send on: what
    /// haproxy's send-proxy says of a connection it accepted.
    private static func origin(of fd: Int32, peer: SocketAddress?) -> ProxyHeader {
        guard let peer, let local = try? Net.localAddress(fd) else { return .local }
        return .proxied(source: peer, destination: local)
    }

    /// `forward ws`: TLS and the upgrade first (a request for another path never costs a
    /// target connection), then the dial.
    private func acceptUpgrade(_ fd: Int32, peer: SocketAddress?, layers: WebSocketLayers, proxyHeader: (ProxyProtocolVersion, ProxyHeader)?) {
        let channel: AsyncDuplex
        do {
            channel = try layers.incomingChannel(fd, on: loop)
        } catch {
            forwarder.release()
            logger.warning("cannot set up connection", metadata: ["peer": "\(peer.logDescription)", "error": "\(error)"])
            return
        }
        let pending = relays.add { channel.fail(.closed) }
        let timer = loop.schedule(after: layers.ingress?.handshakeTimeout ?? .seconds(10)) { channel.fail(.timedOut("WebSocket handshake")) }
        Task(executorPreference: loop.tasks) { [self] in
            defer {
                timer.cancel()
                relays.remove(pending: pending)
            }
            do {
                let stream = try await layers.acceptUpgrade(on: channel)
                dial(client: stream, peer: peer, proxyHeader: proxyHeader)
            } catch {
                forwarder.release()
                if let refusal = error as? WebSocketRefusal {
                    // Its answer is in flight: FIN, not a reset that could drop it.
                    channel.close()
                    guard forwarder.refusals.record("http_\(refusal.status)") else { return }
                    logger.warning("websocket upgrade refused", metadata: [
                        "peer": "\(peer.logDescription)", "status": .stringConvertible(refusal.status), "reason": "\(refusal.reason)"])
                } else {
                    channel.fail(error as? ChannelError ?? .closed)
                    guard forwarder.refusals.record("handshake_failed") else { return }
                    logger.warning("websocket handshake failed", metadata: ["peer": "\(peer.logDescription)", "error": "\(error)"])
                }
            }
        }
    }

    private func dial(client: Duplex, peer: SocketAddress?, proxyHeader: (ProxyProtocolVersion, ProxyHeader)? = nil) {
        let connection = ForwardedConnection(worker: self, client: client, peer: peer, plan: targets.plan(now: loop.now),
                                             acceptedAt: loop.now, proxyHeader: proxyHeader)
        let connector = Connector(loop: loop, addresses: connection.plan.addresses, timeout: config.connectTimeout,
            onAttemptFailed: { [connection] index, error in
                connection.worker.targetFailed(connection.plan.attempts[index], error: error)
            },
            onDone: { [connection] connector, outcome in
                connection.connectedQuietly = connector.connectedQuietly
                connection.worker.connectFinished(connection, outcome: outcome)
            })
        connection.pending = relays.add(pending: connector.cancel)
        connector.start()
    }

    private func targetFailed(_ attempt: TargetSet.Attempt, error: SystemError) {
        forwarder.targetFailed(attempt, error: error, now: loop.now)
    }

    private func connectFinished(_ connection: ForwardedConnection, outcome: Connector.Outcome) {
        if let pending = connection.pending { relays.remove(pending: pending) }
        let client = connection.client, peer = connection.peer
        switch outcome {
        case .exhausted(let tried, _):
            client.close(reset: true)
            forwarder.release()
            meter.count(result: "connect-failed")
            logger.error("no target reachable", metadata: ["peer": "\(peer.logDescription)", "tried": .stringConvertible(tried), "reason": "connect-failed"])
        case .cancelled:
            client.close(reset: true)
            forwarder.release()
            meter.count(result: CloseReason.drainTimeout.label)
            logger.info("connection closed", metadata: ["peer": "\(peer.logDescription)", "up": .stringConvertible(0), "down": .stringConvertible(0), "reason": "\(CloseReason.drainTimeout.label)"])
        case .connected(let fd, let registration, let index):
            let attempt = connection.plan.attempts[index]
            connection.target = attempt.address
            meters.observeConnect(since: connection.acceptedAt)
            targets.markUp(attempt.target)
            if let layers = webSocket, layers.egress != nil {
                // The upgrade runs on a channel of its own; the relay registers afresh.
                if let registration { loop.deregister(fd: fd, registration: registration) }
                return connectUpgrade(connection, target: fd, layers: layers)
            }
            if let (version, header) = connection.proxyHeader {
                // Before the relay, so the header precedes every client byte; the relay
                // still splices, the header being one small write of its own.
                do {
                    try header.write(version, to: fd)
                } catch {
                    if let registration { loop.forget(registration: registration) }
                    Posix.close(fd)
                    client.close(reset: true)
                    forwarder.release()
                    meter.count(result: "connect-failed")
                    logger.error("cannot send PROXY header", metadata: ["peer": "\(peer.logDescription)", "target": "\(attempt.address)", "error": "\(error)"])
                    return
                }
            }
            startRelay(connection, target: TCPStream(fd: fd), registration: registration)
        }
    }

    /// A `ws://`/`wss://` target: TLS and the upgrade on the new connection, then the relay.
    private func connectUpgrade(_ connection: ForwardedConnection, target fd: Int32, layers: WebSocketLayers) {
        let client = connection.client, peer = connection.peer, address = connection.target
        let channel: AsyncDuplex
        do {
            channel = try layers.outgoingChannel(fd, on: loop)
        } catch {
            client.close(reset: true)
            forwarder.release()
            logger.warning("cannot set up connection", metadata: ["target": "\(address.logDescription)", "error": "\(error)"])
            return
        }
        let pending = relays.add { channel.fail(.closed) }
        let timer = loop.schedule(after: layers.egress?.handshakeTimeout ?? .seconds(10)) { channel.fail(.timedOut("WebSocket handshake")) }
        Task(executorPreference: loop.tasks) { [self] in
            defer {
                timer.cancel()
                relays.remove(pending: pending)
            }
            do {
                let stream = try await layers.connectUpgrade(on: channel)
                startRelay(connection, target: stream, registration: nil)
            } catch {
                channel.fail(error as? ChannelError ?? .closed)
                client.close(reset: true)
                forwarder.release()
                guard forwarder.refusals.record("upgrade_failed") else { return }
                logger.error("websocket upgrade failed", metadata: [
                    "peer": "\(peer.logDescription)", "target": "\(layers.egress.map { "\($0.url)" } ?? address.logDescription)", "error": "\(error)"])
            }
        }
    }

    private func startRelay(_ connection: ForwardedConnection, target: Duplex, registration: Registration?) {
        let client = connection.client
        let relay = relays.start(a: client, b: target, preferSplice: config.splice, idleTimeout: config.idleTimeout,
                                 adopting: registration, adoptedQuiet: connection.connectedQuietly,
                                 peer: connection.peer.logDescription) { [connection] relay, reason in
            connection.worker.relayEnded(connection, relay: relay, reason: reason)
        }
        guard let relay else { return forwarder.release() }
        // Plain TCP on both ends (the common case) skips the WebSocket checks: they copy
        // the settings and cast each end, work a connection should not pay for unused.
        guard webSocket != nil else { return }
        let pings = [(client, config.ingress?.settings.pingInterval), (target, config.egress?.settings.pingInterval)]
        for case let (ws as WebSocketStream, interval?) in pings {
            ws.startKeepalive(on: loop, interval: interval) { [weak relay] in
                relay?.abort(.reset(SystemError("websocket: no pong within \(DurationSpec.format(interval))", errno: ETIMEDOUT)))
            }
        }
    }

    private func relayEnded(_ connection: ForwardedConnection, relay: CopyBidirectional, reason: CloseReason) {
        forwarder.release()
        logger.connectionClosed(peer: connection.peer.logDescription, "target", connection.target.logDescription, relay: relay, reason: reason)
    }

    /// Stops accepting; `onIdle` runs (on this loop) once the last connection has ended.
    func beginDrain(onIdle: @escaping () -> Void) {
        listeners.stop()
        relays.whenIdle(onIdle)
    }

    /// Ends every connection now (drain deadline passed).
    func abortAll(_ reason: CloseReason) {
        relays.abortAll(reason)
    }
}

/// One client from its dial to the end of its relay: everything the connect callbacks
/// and the close line need, in the one object those closures capture (a closure that
/// captures a single object needs no context of its own, and the pending token needs
/// no box). It holds its worker strongly; the worker's relay set drops it when the
/// dial or the relay ends, on every path.
private final class ForwardedConnection {
    let worker: ForwardWorker
    let client: Duplex
    let peer: SocketAddress?
    let plan: TargetSet.Plan
    let acceptedAt: UInt64
    let proxyHeader: (ProxyProtocolVersion, ProxyHeader)?
    var pending: RelaySet.Pending?
    /// The address that answered; nil until then.
    var target: SocketAddress?
    /// `Connector.connectedQuietly` of the dial, for the relay that adopts its registration.
    var connectedQuietly = false

    init(worker: ForwardWorker, client: Duplex, peer: SocketAddress?, plan: TargetSet.Plan, acceptedAt: UInt64,
         proxyHeader: (ProxyProtocolVersion, ProxyHeader)?) {
        self.worker = worker
        self.client = client
        self.peer = peer
        self.plan = plan
        self.acceptedAt = acceptedAt
        self.proxyHeader = proxyHeader
    }
}
