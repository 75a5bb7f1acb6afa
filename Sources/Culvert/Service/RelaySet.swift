import Logging
import Reactor
import Transfer

/// What a relay set tells its observer: the hook metrics hang on.
enum RelayEvent {
    case started(CopyBidirectional)
    case ended(CopyBidirectional, CloseReason)
    /// The set's service is gone and its last relay ended: no event follows.
    case retired(RelaySet)
}

/// The relays of one service on one loop, and the work that will become relays
/// (connections still being dialed or handshaken). It starts relays, counts them, says
/// when it is idle, and aborts what is left at a drain deadline; no other type keeps a
/// table of running relays.
///
/// Thread confinement: every method runs on `loop`.
final class RelaySet {
    /// One unit of pending work; `remove(pending:)` with it once it ended.
    struct Pending: Hashable {
        fileprivate let raw: Int
    }

    let loop: EventLoop
    let resources: LoopResources
    private let logger: Logger
    private var relays: [ObjectIdentifier: CopyBidirectional] = [:]
    private var pending: [Pending: () -> Void] = [:]
    private var nextPending = 0
    private var idleWaiters: [() -> Void] = []
    /// Sees every relay start and end (after the relay's own `onClose`).
    var observer: ((RelayEvent) -> Void)?

    init(loop: EventLoop, resources: LoopResources, logger: Logger) {
        self.loop = loop
        self.resources = resources
        self.logger = logger
    }

    /// Relays running now.
    var count: Int { relays.count }
    /// Relays plus pending work.
    var load: Int { relays.count + pending.count }
    var isIdle: Bool { relays.isEmpty && pending.isEmpty }

    /// Bytes moved so far by the relays running now: a scrape adds them to what ended
    /// relays moved, so long connections show up before they end.
    var bytesInFlight: (up: UInt64, down: UInt64) {
        relays.values.reduce((0, 0)) { ($0.0 + $1.bytesAToB, $0.1 + $1.bytesBToA) }
    }

    /// Starts relaying between `a` and `b`. `onClose` runs once the relay has ended and
    /// left the set (log its close line there). When the relay cannot start, both ends
    /// are closed, a warning names `peer`, and the result is nil.
    @discardableResult
    func start(a: Duplex, b: Duplex, preferSplice: Bool = true, idleTimeout: Duration? = nil,
               adopting registration: Registration? = nil, peer: @autoclosure () -> String,
               onClose: @escaping (CopyBidirectional, CloseReason) -> Void) -> CopyBidirectional? {
        loop.assertInLoop()
        let relay = CopyBidirectional(loop: loop, resources: resources, a: a, b: b, preferSplice: preferSplice,
                                      idleTimeout: idleTimeout) { [unowned self] relay, reason in
            relays[ObjectIdentifier(relay)] = nil
            onClose(relay, reason)
            observer?(.ended(relay, reason))
            checkIdle()
        }
        relays[ObjectIdentifier(relay)] = relay
        do {
            try relay.start(adopting: registration)
        } catch {
            // start() closed both ends; onClose is not called for a relay that never ran.
            relays[ObjectIdentifier(relay)] = nil
            logger.warning("cannot start relay", metadata: ["peer": "\(peer())", "error": "\(error)"])
            checkIdle()
            return nil
        }
        observer?(.started(relay))
        return relay
    }

    /// Counts work that will become a relay (or fail); `cancel` ends it at a drain deadline.
    func add(pending cancel: @escaping () -> Void = {}) -> Pending {
        loop.assertInLoop()
        nextPending += 1
        let token = Pending(raw: nextPending)
        pending[token] = cancel
        return token
    }

    func remove(pending token: Pending) {
        loop.assertInLoop()
        guard pending.removeValue(forKey: token) != nil else { return }
        checkIdle()
    }

    /// Runs `action` (on the loop) once nothing runs in the set: at once when idle now.
    func whenIdle(_ action: @escaping () -> Void) {
        loop.assertInLoop()
        idleWaiters.append(action)
        checkIdle()
    }

    /// Cancels pending work and resets every running relay.
    func abortAll(_ reason: CloseReason) {
        loop.assertInLoop()
        for cancel in Array(pending.values) { cancel() }
        for relay in Array(relays.values) { relay.abort(reason) }
    }

    private func checkIdle() {
        guard isIdle, !idleWaiters.isEmpty else { return }
        let waiters = idleWaiters
        idleWaiters.removeAll()
        for w in waiters { w() }
    }

    /// Waits until every set in `sets` (all on `loop`) is idle; when `timeout` passes
    /// first, logs once and aborts what is left.
    static func drain(_ sets: [RelaySet], on loop: EventLoop, timeout: Duration, logger: Logger) async {
        let busy = sets.filter { !$0.isIdle }
        if busy.isEmpty { return }
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            var left = busy.count
            let deadline = loop.schedule(after: timeout) {
                logger.warning("drain deadline passed, closing remaining connections",
                               metadata: ["connections": .stringConvertible(busy.reduce(0) { $0 + $1.load })])
                for s in busy { s.abortAll(.drainTimeout) }
            }
            for s in busy {
                s.whenIdle {
                    left -= 1
                    if left == 0 {
                        deadline.cancel()
                        done.resume()
                    }
                }
            }
        }
    }
}

/// Every relay set of one command on one loop, including the sets of services that are
/// gone but whose relays still run (a tunnel client that disconnected leaves its
/// visitors' relays going): what a drain walks.
///
/// Thread confinement: every method runs on `loop`.
final class RelayGroup {
    let loop: EventLoop
    let resources = LoopResources()
    private let logger: Logger
    private var sets: [ObjectIdentifier: RelaySet] = [:]

    init(loop: EventLoop, logger: Logger) {
        self.loop = loop
        self.logger = logger
    }

    /// A new set for one service on this loop.
    func makeSet() -> RelaySet {
        let set = RelaySet(loop: loop, resources: resources, logger: logger)
        sets[ObjectIdentifier(set)] = set
        return set
    }

    /// The service is gone: the set leaves the group once its last relay ended.
    func retire(_ set: RelaySet) {
        set.whenIdle { [weak self] in
            self?.sets[ObjectIdentifier(set)] = nil
            set.observer?(.retired(set))
        }
    }

    /// Relays running in every set.
    var count: Int { sets.values.reduce(0) { $0 + $1.count } }

    /// Waits until every set is idle, sets that start relays during the drain included
    /// (a visitor handed over from another loop), aborting what is left at `timeout`.
    func drain(timeout: Duration) async {
        let deadline = loop.now &+ timeout.nanoseconds
        while true {
            let busy = sets.values.filter { !$0.isIdle }
            if busy.isEmpty { return }
            let left = deadline > loop.now ? deadline - loop.now : 0
            await RelaySet.drain(busy, on: loop, timeout: .nanoseconds(Int64(left)), logger: logger)
        }
    }
}
