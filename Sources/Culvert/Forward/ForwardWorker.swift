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
    private let resources = LoopResources()
    private var acceptors: [Acceptor] = []
    private var dialers: [ObjectIdentifier: Dialer] = [:]
    private var relays: [ObjectIdentifier: CopyBidirectional] = [:]
    private var draining = false
    private var onIdle: (() -> Void)?
    private var lastLimitLog: UInt64 = 0

    init(loop: EventLoop, forwarder: TCPForwarder) {
        self.loop = loop
        self.forwarder = forwarder
    }

    var connectionCount: Int { dialers.count + relays.count }

    func startAccepting(listeners: [(fd: Int32, address: SocketAddress)]) {
        loop.assertInLoop()
        for l in listeners {
            let acceptor = Acceptor(loop: loop, fd: l.fd, address: l.address,
                onAccept: { [unowned self] fd, peer in accepted(fd, peer: peer) },
                onError: { [unowned self] error in
                    forwarder.logger.warning("accept failed", metadata: ["listen": "\(l.address)", "error": "\(error)"])
                })
            do {
                try acceptor.start()
                acceptors.append(acceptor)
            } catch {
                forwarder.logger.error("cannot watch listener", metadata: ["listen": "\(l.address)", "error": "\(error)"])
                acceptor.stop()
            }
        }
    }

    private func accepted(_ fd: Int32, peer: SocketAddress?) {
        // Addresses are formatted only when a line is logged: most connections log nothing
        // below info, and inet_ntop plus string building per connection adds up.
        guard forwarder.admit() else {
            Net.closeWithReset(fd)
            if loop.now &- lastLimitLog >= 1_000_000_000 {
                lastLimitLog = loop.now
                forwarder.logger.warning("connection refused: limit reached",
                    metadata: ["peer": "\(peer.logDescription)", "max": .stringConvertible(forwarder.config.maxConnections), "reason": "limit"])
            }
            return
        }
        let dialer = Dialer(loop: loop, attempts: forwarder.targets.attempts(now: loop.now),
                            connectTimeout: forwarder.config.connectTimeout,
            onTargetFailure: { [unowned self] attempt, error in
                forwarder.targetFailed(attempt, error: error, now: loop.now)
            },
            onDone: { [unowned self] dialer, outcome in
                dialers[ObjectIdentifier(dialer)] = nil
                connectFinished(client: fd, peer: peer, outcome: outcome)
            })
        dialers[ObjectIdentifier(dialer)] = dialer
        dialer.start()
    }

    private func connectFinished(client: Int32, peer: SocketAddress?, outcome: Dialer.Outcome) {
        switch outcome {
        case .exhausted(let tried):
            Net.closeWithReset(client)
            forwarder.release()
            forwarder.logger.error("no target reachable", metadata: ["peer": "\(peer.logDescription)", "tried": .stringConvertible(tried), "reason": "connect-failed"])
            checkIdle()
        case .cancelled:
            Net.closeWithReset(client)
            forwarder.release()
            forwarder.logger.info("connection closed", metadata: ["peer": "\(peer.logDescription)", "up": .stringConvertible(0), "down": .stringConvertible(0), "reason": "\(CloseReason.drainTimeout.label)"])
            checkIdle()
        case .connected(let fd, let registration, let attempt):
            forwarder.targets.markUp(attempt.target)
            let target = attempt.address
            let relay = CopyBidirectional(loop: loop, resources: resources,
                                          a: TCPStream(fd: client, noDelay: false), b: TCPStream(fd: fd),
                                          preferSplice: forwarder.config.splice,
                                          idleTimeout: forwarder.config.idleTimeout) { [unowned self] relay, reason in
                relays[ObjectIdentifier(relay)] = nil
                forwarder.release()
                forwarder.logClose(peer: peer, target: target, relay: relay, reason: reason)
                checkIdle()
            }
            relays[ObjectIdentifier(relay)] = relay
            do {
                try relay.start(adopting: registration)
            } catch {
                // start() closed both sockets; onClose is not called for a relay that never ran.
                relays[ObjectIdentifier(relay)] = nil
                forwarder.release()
                forwarder.logger.error("cannot register connection", metadata: ["peer": "\(peer.logDescription)", "error": "\(error)"])
                checkIdle()
            }
        }
    }

    /// Stops accepting; `onIdle` runs (on this loop) once the last connection has ended.
    func beginDrain(onIdle: @escaping () -> Void) {
        loop.assertInLoop()
        draining = true
        self.onIdle = onIdle
        for a in acceptors { a.stop() }
        acceptors.removeAll()
        checkIdle()
    }

    /// Ends every connection now (drain deadline passed).
    func abortAll(_ reason: CloseReason) {
        loop.assertInLoop()
        for d in Array(dialers.values) { d.cancel() }
        for r in Array(relays.values) { r.abort(reason) }
    }

    private func checkIdle() {
        guard draining, connectionCount == 0, let done = onIdle else { return }
        onIdle = nil
        done()
    }
}
