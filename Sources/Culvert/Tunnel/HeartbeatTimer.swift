import Reactor

/// The liveness of one control channel, the same at both ends: a ping every interval,
/// and the peer declared silent when nothing at all was heard from it for
/// `Heartbeat.deadAfter` (any frame counts, not only pongs).
///
/// Thread confinement: lives on the loop of its control channel.
final class HeartbeatTimer {
    private let loop: EventLoop
    private let heartbeat: Heartbeat
    private let sendPing: (UInt64) -> Void
    private let onSilence: () -> Void
    private var lastHeard: UInt64
    private var timer: LoopTimer?

    /// - Parameters:
    ///   - sendPing: sends a ping carrying the given timestamp.
    ///   - onSilence: the peer stopped answering; called once, after which the timer is stopped.
    init(loop: EventLoop, heartbeat: Heartbeat, sendPing: @escaping (UInt64) -> Void, onSilence: @escaping () -> Void) {
        self.loop = loop
        self.heartbeat = heartbeat
        self.sendPing = sendPing
        self.onSilence = onSilence
        lastHeard = loop.now
    }

    func start() {
        loop.assertInLoop()
        lastHeard = loop.now
        schedule()
    }

    /// A frame arrived from the peer.
    func heard() { lastHeard = loop.now }

    func stop() {
        timer?.cancel()
        timer = nil
    }

    private func schedule() {
        timer = loop.schedule(after: heartbeat.interval) { [weak self] in
            guard let self, self.timer != nil else { return }
            if self.loop.now &- self.lastHeard > self.heartbeat.deadAfter.nanoseconds {
                self.timer = nil
                self.onSilence()
                return
            }
            self.sendPing(self.loop.now)
            self.schedule()
        }
    }
}
