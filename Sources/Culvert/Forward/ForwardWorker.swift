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
    private let relays: RelaySet
    private let listeners: Listeners
    private var lastLimitLog: UInt64 = 0
    let meters: LoopMeters
    private let meter: ServiceMeter

    init(loop: EventLoop, forwarder: TCPForwarder) {
        self.loop = loop
        self.forwarder = forwarder
        relays = RelaySet(loop: loop, resources: LoopResources(), logger: forwarder.logger)
        listeners = Listeners(loop: loop, logger: forwarder.logger)
        meters = LoopMeters(loop: loop)
        meter = meters.service(forwarder.serviceName, kind: "tcp")
        meter.watch(relays)
    }

    func startAccepting(listeners bound: [(fd: Int32, address: SocketAddress)]) {
        do {
            try listeners.start(bound) { [unowned self] fd, peer in accepted(fd, peer: peer) }
        } catch {
            forwarder.logger.error("cannot watch listener", metadata: ["listen": "\(bound.map { "\($0.address)" }.joined(separator: ","))", "error": "\(error)"])
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
                forwarder.logger.warning("connection refused: limit reached",
                    metadata: ["peer": "\(peer.logDescription)", "max": .stringConvertible(forwarder.config.maxConnections), "reason": "limit"])
            }
            return
        }
        if forwarder.config.acceptProxy { return readProxyHeader(fd, peer: peer) }
        admitted(fd, peer: peer, origin: nil)
    }

    /// `--accept-proxy`: the client's first bytes must be a PROXY header, whose source
    /// is the client from here on (logs, the header we send on). Anything else closes the
    /// connection before a target is dialled.
    private func readProxyHeader(_ fd: Int32, peer: SocketAddress?) {
        var pending: RelaySet.Pending?
        let reader = ProxyHeaderReader(loop: loop, fd: fd, timeout: forwarder.config.proxyHeaderTimeout) { [unowned self] outcome in
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
                forwarder.logger.warning("connection refused: bad PROXY header", metadata: [
                    "peer": "\(peer.logDescription)", "reason": "\(error.label)", "error": "\(error)"])
            }
        }
        pending = relays.add(pending: reader.cancel)
        reader.start()
    }

    /// A client taken in (past the limit and any PROXY header); `origin` is the header it
    /// sent, nil without `--accept-proxy`.
    private func admitted(_ fd: Int32, peer: SocketAddress?, origin: ProxyHeader?) {
        let outgoing = forwarder.config.sendProxy.map { ($0, origin ?? Self.origin(of: fd, peer: peer)) }
        if let layers = forwarder.webSocket, layers.ingress != nil {
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
            forwarder.logger.warning("cannot set up connection", metadata: ["peer": "\(peer.logDescription)", "error": "\(error)"])
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
                    forwarder.logger.warning("websocket upgrade refused", metadata: [
                        "peer": "\(peer.logDescription)", "status": .stringConvertible(refusal.status), "reason": "\(refusal.reason)"])
                } else {
                    channel.fail(error as? ChannelError ?? .closed)
                    guard forwarder.refusals.record("handshake_failed") else { return }
                    forwarder.logger.warning("websocket handshake failed", metadata: ["peer": "\(peer.logDescription)", "error": "\(error)"])
                }
            }
        }
    }

    private func dial(client: Duplex, peer: SocketAddress?, proxyHeader: (ProxyProtocolVersion, ProxyHeader)? = nil) {
        let attempts = forwarder.targets.attempts(now: loop.now)
        let acceptedAt = loop.now
        var pending: RelaySet.Pending?
        let connector = Connector(loop: loop, addresses: attempts.map(\.address), timeout: forwarder.config.connectTimeout,
            onAttemptFailed: { [unowned self] index, error in
                forwarder.targetFailed(attempts[index], error: error, now: loop.now)
            },
            onDone: { [unowned self] _, outcome in
                if let pending { relays.remove(pending: pending) }
                connectFinished(client: client, peer: peer, attempts: attempts, acceptedAt: acceptedAt, outcome: outcome, proxyHeader: proxyHeader)
            })
        pending = relays.add(pending: connector.cancel)
        connector.start()
    }

    private func connectFinished(client: Duplex, peer: SocketAddress?, attempts: [TargetSet.Attempt], acceptedAt: UInt64,
                                 outcome: Connector.Outcome, proxyHeader: (ProxyProtocolVersion, ProxyHeader)?) {
        switch outcome {
        case .exhausted(let tried, _):
            client.close(reset: true)
            forwarder.release()
            meter.count(result: "connect-failed")
            forwarder.logger.error("no target reachable", metadata: ["peer": "\(peer.logDescription)", "tried": .stringConvertible(tried), "reason": "connect-failed"])
        case .cancelled:
            client.close(reset: true)
            forwarder.release()
            meter.count(result: CloseReason.drainTimeout.label)
            forwarder.logger.info("connection closed", metadata: ["peer": "\(peer.logDescription)", "up": .stringConvertible(0), "down": .stringConvertible(0), "reason": "\(CloseReason.drainTimeout.label)"])
        case .connected(let fd, let registration, let index):
            let attempt = attempts[index]
            meters.observeConnect(since: acceptedAt)
            forwarder.targets.markUp(attempt.target)
            if let layers = forwarder.webSocket, layers.egress != nil {
                // The upgrade runs on a channel of its own; the relay registers afresh.
                if let registration { loop.deregister(fd: fd, registration: registration) }
                return connectUpgrade(client: client, target: fd, address: attempt.address, peer: peer, layers: layers)
            }
            if let (version, header) = proxyHeader {
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
                    forwarder.logger.error("cannot send PROXY header", metadata: ["peer": "\(peer.logDescription)", "target": "\(attempt.address)", "error": "\(error)"])
                    return
                }
            }
            startRelay(client: client, target: TCPStream(fd: fd), address: attempt.address, registration: registration, peer: peer)
        }
    }

    /// A `ws://`/`wss://` target: TLS and the upgrade on the new connection, then the relay.
    private func connectUpgrade(client: Duplex, target fd: Int32, address: SocketAddress, peer: SocketAddress?, layers: WebSocketLayers) {
        let channel: AsyncDuplex
        do {
            channel = try layers.outgoingChannel(fd, on: loop)
        } catch {
            client.close(reset: true)
            forwarder.release()
            forwarder.logger.warning("cannot set up connection", metadata: ["target": "\(address)", "error": "\(error)"])
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
                startRelay(client: client, target: stream, address: address, registration: nil, peer: peer)
            } catch {
                channel.fail(error as? ChannelError ?? .closed)
                client.close(reset: true)
                forwarder.release()
                guard forwarder.refusals.record("upgrade_failed") else { return }
                forwarder.logger.error("websocket upgrade failed", metadata: [
                    "peer": "\(peer.logDescription)", "target": "\(layers.egress.map { "\($0.url)" } ?? "\(address)")", "error": "\(error)"])
            }
        }
    }

    private func startRelay(client: Duplex, target: Duplex, address: SocketAddress, registration: Registration?, peer: SocketAddress?) {
        let relay = relays.start(a: client, b: target, preferSplice: forwarder.config.splice, idleTimeout: forwarder.config.idleTimeout,
                                 adopting: registration, peer: peer.logDescription) { [unowned self] relay, reason in
            forwarder.release()
            forwarder.logClose(peer: peer, target: address, relay: relay, reason: reason)
        }
        guard let relay else { return forwarder.release() }
        // Plain TCP on both ends (the common case) skips the WebSocket checks: they copy
        // the settings and cast each end, work a connection should not pay for unused.
        guard forwarder.webSocket != nil else { return }
        let pings = [(client, forwarder.config.ingress?.settings.pingInterval), (target, forwarder.config.egress?.settings.pingInterval)]
        for case let (ws as WebSocketStream, interval?) in pings {
            ws.startKeepalive(on: loop, interval: interval) { [weak relay] in
                relay?.abort(.reset(SystemError("websocket: no pong within \(DurationSpec.format(interval))", errno: ETIMEDOUT)))
            }
        }
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
