import Logging
import Reactor
import Transfer

/// The part of `culvert proxy` that lives on one loop: its listening socket, the
/// clients in their handshake (pending work of the relay set) and the running relays,
/// counted on `meter` (of this loop).
///
/// Thread confinement: every method runs on `loop`.
final class ProxyWorker: ServiceShare {
    let loop: EventLoop
    private let context: ProxyContext
    private let relays: RelaySet
    private let listeners: Listeners
    private let idleClients = IdleClients()

    init(loop: EventLoop, context: ProxyContext, meter: ServiceMeter) {
        self.loop = loop
        self.context = context
        relays = RelaySet(loop: loop, resources: LoopResources(), logger: context.logger)
        meter.watch(relays)
        listeners = Listeners(loop: loop, logger: context.logger)
    }

    func startAccepting(listeners bound: [(fd: Int32, address: SocketAddress)]) {
        do {
            try listeners.start(bound) { [unowned self] fd, peer in accepted(fd, peer: peer) }
        } catch {
            context.logger.error("cannot watch listener", metadata: ["listen": "\(bound.map { "\($0.address)" }.joined(separator: ","))", "error": "\(error)"])
        }
    }

    /// A client connection accepted here, or handed to this loop by the one that accepted it.
    func accepted(_ fd: Int32, peer: SocketAddress?) {
        ProxyConnection.serve(TCPStream(fd: fd, noDelay: false), peer: peer.logDescription, peerAddress: peer, context: context,
                              relays: relays, idleClients: idleClients)
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
