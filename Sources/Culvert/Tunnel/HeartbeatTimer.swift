import Reactor

/// The liveness of one control channel, the same at both ends: a ping every interval,
/// and the peer declared silent when nothing at all was heard from it for
/// `Heartbeat.deadAfter` (any frame counts, not only pongs). A probe asks sooner: a ping
/// now, and an answer as soon as anything is heard or its deadline passes.
///
/// Thread confinement: lives on the loop of its control channel.
final class HeartbeatTimer {
    private let loop: EventLoop
    private let heartbeat: Heartbeat
    private let sendPing: (UInt64) -> Void
    private let onSilence: () -> Void
    private var lastHeard: UInt64
    private var timer: LoopTimer?
    /// Who waits for the running probe's answer, and its deadline (nil: no probe running).
    private var probeWaiters: [(Bool) -> Void] = []
    private var probeDeadline: LoopTimer?

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
    func heard() {
        lastHeard = loop.now
        if probeDeadline != nil { finishProbe(answered: true) }
    }

    /// Sends a ping now; `answer` gets true as soon as any frame arrives, false when none
    /// did within `deadline` (or the timer stopped first). Probes asked for while one
    /// runs share it.
    func probe(within deadline: Duration, _ answer: @escaping (Bool) -> Void) {
        loop.assertInLoop()
        probeWaiters.append(answer)
        guard probeDeadline == nil else { return }
        probeDeadline = loop.schedule(after: deadline) { [weak self] in self?.finishProbe(answered: false) }
        sendPing(loop.now)
    }

    func stop() {
        timer?.cancel()
        timer = nil
        finishProbe(answered: false)
    }

    private func finishProbe(answered: Bool) {
        probeDeadline?.cancel()
        probeDeadline = nil
        let waiters = probeWaiters
        probeWaiters.removeAll()
        for answer in waiters { answer(answered) }
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
