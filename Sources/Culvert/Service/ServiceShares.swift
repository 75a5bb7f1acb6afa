import Logging
import Reactor
import Transfer

/// A listening service's share on one loop (`ForwardWorker`, `ProxyWorker`): its
/// listeners there and the relays they accepted. Its methods run on `loop`.
protocol ServiceShare: AnyObject {
    var loop: EventLoop { get }
    /// Stops accepting; `onIdle` runs (on `loop`) once the last connection has ended.
    func beginDrain(onIdle: @escaping () -> Void)
    /// Ends every connection now (drain deadline passed).
    func abortAll(_ reason: CloseReason)
}

/// Drains every share of a service: each stops accepting and lets its connections
/// finish; when `timeout` passes first, what is left is reset with one log line.
/// `active` counts the service's connections over all loops. Runs on `main`; returns
/// once every share is idle.
func drain(_ shares: [some ServiceShare], main: EventLoop, timeout: Duration, logger: Logger,
           active: @escaping () -> Int) async {
    logger.notice("draining", metadata: ["connections": .stringConvertible(active()), "deadline": .seconds(timeout)])
    await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
        var deadline: LoopTimer?
        let barrier = Barrier(count: shares.count) {
            deadline?.cancel()
            done.resume()
        }
        deadline = main.schedule(after: timeout) {
            guard active() > 0 else { return }
            logger.warning("drain deadline passed, closing remaining connections",
                           metadata: ["connections": .stringConvertible(active())])
            for s in shares { s.loop.execute { s.abortAll(.drainTimeout) } }
        }
        for s in shares {
            s.loop.execute { s.beginDrain { main.execute { barrier.arrive() } } }
        }
    }
}
