import Logging
import Reactor
import Transfer

/// The part of a TCP forwarder that lives on one event loop: its listeners, the clients
/// being connected to a target, and the running relays. Nothing here is shared with
/// other loops except the forwarder's atomic counters and target health.
///
/// Thread confinement: every method runs on `loop`.
final class ForwardWorker {
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
        let attempts = forwarder.targets.attempts(now: loop.now)
        let acceptedAt = loop.now
        var pending: RelaySet.Pending?
        let connector = Connector(loop: loop, addresses: attempts.map(\.address), timeout: forwarder.config.connectTimeout,
            onAttemptFailed: { [unowned self] index, error in
                forwarder.targetFailed(attempts[index], error: error, now: loop.now)
            },
            onDone: { [unowned self] _, outcome in
                if let pending { relays.remove(pending: pending) }
                connectFinished(client: fd, peer: peer, attempts: attempts, acceptedAt: acceptedAt, outcome: outcome)
            })
        pending = relays.add(pending: connector.cancel)
        connector.start()
    }

    private func connectFinished(client: Int32, peer: SocketAddress?, attempts: [TargetSet.Attempt], acceptedAt: UInt64,
                                 outcome: Connector.Outcome) {
        switch outcome {
        case .exhausted(let tried, _):
            Net.closeWithReset(client)
            forwarder.release()
            meter.count(result: "connect-failed")
            forwarder.logger.error("no target reachable", metadata: ["peer": "\(peer.logDescription)", "tried": .stringConvertible(tried), "reason": "connect-failed"])
        case .cancelled:
            Net.closeWithReset(client)
            forwarder.release()
            meter.count(result: CloseReason.drainTimeout.label)
            forwarder.logger.info("connection closed", metadata: ["peer": "\(peer.logDescription)", "up": .stringConvertible(0), "down": .stringConvertible(0), "reason": "\(CloseReason.drainTimeout.label)"])
        case .connected(let fd, let registration, let index):
            let attempt = attempts[index]
            meters.observeConnect(since: acceptedAt)
            forwarder.targets.markUp(attempt.target)
            let target = attempt.address
            let started = relays.start(a: TCPStream(fd: client, noDelay: false), b: TCPStream(fd: fd),
                                       preferSplice: forwarder.config.splice, idleTimeout: forwarder.config.idleTimeout,
                                       adopting: registration, peer: peer.logDescription) { [unowned self] relay, reason in
                forwarder.release()
                forwarder.logClose(peer: peer, target: target, relay: relay, reason: reason)
            }
            if started == nil { forwarder.release() }
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
