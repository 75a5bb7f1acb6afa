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
        fileprivate let slot: Int
        fileprivate let generation: UInt64
    }

    /// A pending unit's cancel action. A struct so that a table of them stores each
    /// closure as it is; a table of bare closures wraps every one it takes in a thunk
    /// (an allocation per connection).
    private struct PendingWork {
        var generation: UInt64 = 0
        var cancel: (() -> Void)?
    }

    let loop: EventLoop
    let resources: LoopResources
    private let logger: Logger
    // Slot tables with free lists rather than dictionaries: a relay or pending unit
    // comes and goes with every connection, and a slot costs no hashing.
    private var relays: [CopyBidirectional?] = []
    private var freeRelaySlots: [Int] = []
    /// Relays running now.
    private(set) var count = 0
    private var pending: [PendingWork] = []
    private var freePendingSlots: [Int] = []
    private var pendingCount = 0
    private var idleWaiters: [() -> Void] = []
    /// Sees every relay start and end (after the relay's own `onClose`).
    var observer: ((RelayEvent) -> Void)?

    init(loop: EventLoop, resources: LoopResources, logger: Logger) {
        self.loop = loop
        self.resources = resources
        self.logger = logger
    }

    /// Relays plus pending work.
    var load: Int { count + pendingCount }
    var isIdle: Bool { count == 0 && pendingCount == 0 }

    /// Bytes moved so far by the relays running now: a scrape adds them to what ended
    /// relays moved, so long connections show up before they end.
    var bytesInFlight: (up: UInt64, down: UInt64) {
        relays.reduce((0, 0)) { sum, relay in
            guard let relay else { return sum }
            return (sum.0 + relay.bytesAToB, sum.1 + relay.bytesBToA)
        }
    }

    /// Starts relaying between `a` and `b`. `onClose` runs once the relay has ended and
    /// left the set (log its close line there). When the relay cannot start, both ends
    /// are closed, a warning names `peer`, and the result is nil. `registration` and
    /// `adoptedQuiet` are `CopyBidirectional.start`'s.
    @discardableResult
    func start(a: Duplex, b: Duplex, preferSplice: Bool = true, idleTimeout: Duration? = nil,
               adopting registration: Registration? = nil, adoptedQuiet: Bool = false, peer: @autoclosure () -> String,
               onClose: @escaping (CopyBidirectional, CloseReason) -> Void) -> CopyBidirectional? {
        loop.assertInLoop()
        let slot = freeRelaySlots.popLast() ?? relays.count
        let relay = CopyBidirectional(loop: loop, resources: resources, a: a, b: b, preferSplice: preferSplice,
                                      idleTimeout: idleTimeout) { [unowned self] relay, reason in
            removeRelay(at: slot)
            onClose(relay, reason)
            observer?(.ended(relay, reason))
            checkIdle()
        }
        if slot == relays.count { relays.append(relay) } else { relays[slot] = relay }
        count += 1
        do {
            try relay.start(adopting: registration, adoptedQuiet: adoptedQuiet)
        } catch {
            // start() closed both ends; onClose is not called for a relay that never ran.
            removeRelay(at: slot)
            logger.warning("cannot start relay", metadata: ["peer": "\(peer())", "error": "\(error)"])
            checkIdle()
            return nil
        }
        observer?(.started(relay))
        return relay
    }

    private func removeRelay(at slot: Int) {
        relays[slot] = nil
        freeRelaySlots.append(slot)
        count -= 1
    }

    /// Counts work that will become a relay (or fail); `cancel` ends it at a drain deadline.
    func add(pending cancel: @escaping () -> Void = {}) -> Pending {
        loop.assertInLoop()
        let slot = freePendingSlots.popLast() ?? pending.count
        if slot == pending.count { pending.append(PendingWork()) }
        pending[slot].cancel = cancel
        pendingCount += 1
        return Pending(slot: slot, generation: pending[slot].generation)
    }

    func remove(pending token: Pending) {
        loop.assertInLoop()
        guard token.slot < pending.count, pending[token.slot].generation == token.generation,
              pending[token.slot].cancel != nil else { return }
        // A new generation makes a second remove with the same token a no-op.
        pending[token.slot].generation &+= 1
        pending[token.slot].cancel = nil
        freePendingSlots.append(token.slot)
        pendingCount -= 1
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
        for cancel in pending.compactMap(\.cancel) { cancel() }
        for relay in relays.compactMap({ $0 }) { relay.abort(reason) }
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
