import Logging
import Reactor
import Transfer

/// The part of `culvert proxy` that lives on one loop: its listening socket, the
/// clients in their handshake (pending work of the relay set) and the running relays.
///
/// Thread confinement: every method runs on `loop`.
final class ProxyWorker {
    let loop: EventLoop
    private let context: ProxyContext
    private let relays: RelaySet
    private let listeners: Listeners
    private let idleClients = IdleClients()

    init(loop: EventLoop, context: ProxyContext) {
        self.loop = loop
        self.context = context
        relays = RelaySet(loop: loop, resources: LoopResources(), logger: context.logger)
        listeners = Listeners(loop: loop, logger: context.logger)
    }

    func startAccepting(listeners bound: [(fd: Int32, address: SocketAddress)]) {
        do {
            try listeners.start(bound) { [unowned self] fd, peer in accepted(fd, peer: peer) }
        } catch {
            context.logger.error("cannot watch listener", metadata: ["listen": "\(bound.map { "\($0.address)" }.joined(separator: ","))", "error": "\(error)"])
        }
    }

    private func accepted(_ fd: Int32, peer: SocketAddress?) {
        guard context.admit() else {
            Net.closeWithReset(fd)
            context.refused("limit", "connection refused: limit reached", peer.logDescription,
                            ["max": .stringConvertible(context.maxConnections)])
            return
        }
        let connection: ProxyConnection
        do {
            connection = try ProxyConnection(client: fd, peer: peer, context: context, relays: relays, idleClients: idleClients)
        } catch {
            Posix.close(fd)
            context.release()
            context.logger.warning("cannot set up connection", metadata: ["peer": "\(peer.logDescription)", "error": "\(error)"])
            return
        }
        let outcome = PendingOutcome()
        let task = Task(executorPreference: loop.tasks) { [relays, context] in
            if await !connection.run() { context.release() }
            if let pending = outcome.pending { relays.remove(pending: pending) }
        }
        outcome.pending = relays.add {
            connection.abort()
            task.cancel()
        }
    }

    /// Stops accepting and ends the idle clients; `onIdle` runs (on this loop) once the last connection has ended.
    func beginDrain(onIdle: @escaping () -> Void) {
        listeners.stop()
        idleClients.drain()
        relays.whenIdle(onIdle)
    }

    /// Ends every connection now (drain deadline passed).
    func abortAll(_ reason: CloseReason) {
        relays.abortAll(reason)
    }
}

/// The relay-set entry of a connection in its handshake, set right after the task that
/// removes it is made (the task runs later on the same loop).
private final class PendingOutcome: @unchecked Sendable {
    var pending: RelaySet.Pending?
}
