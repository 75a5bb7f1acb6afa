import Reactor
import Transfer

/// One service's counters on one loop: plain integers that only this loop touches, fed by
/// the relay sets it watches (`RelayEvent`) and by the service's refusal points, read when
/// a scrape gathers them on this loop. Nothing here runs per byte: a relay's byte counts
/// are taken from the relay when it ends, and from the still running relays of the
/// watched sets when sampled.
///
/// Thread confinement: every method runs on the loop of the `LoopMeters` that made it.
final class ServiceMeter {
    private var totals: ServiceSample
    /// Where the service listens, when the meter's owner knows.
    var ports: [String] {
        get { totals.ports }
        set { totals.ports = newValue }
    }
    /// The sets whose relays count here, until a retired set says it is done
    /// (`RelayEvent.retired`). Held strongly: a weak reference would give each set a
    /// side table, which sends every retain and release of the set (several per
    /// connection) down the runtime's slow path.
    private var sets: [ObjectIdentifier: RelaySet] = [:]
    /// Relays ended, one slot per kind of `CloseReason`: an array slot per connection
    /// rather than hashing its label into `totals.results`; `sample` adds them in.
    private var endedByReason = [UInt64](repeating: 0, count: ServiceMeter.reasonLabels.count)
    private static let reasonLabels = [CloseReason.eof, .reset(SystemError("", errno: 0)), .idleTimeout, .drainTimeout].map(\.label)

    init(kind: String) {
        totals = ServiceSample(kind: kind)
    }

    /// Counts the relays of `set` from now on (it becomes the set's observer).
    func watch(_ set: RelaySet) {
        set.observer = { [unowned self] event in record(event) }
        sets[ObjectIdentifier(set)] = set
    }

    private func record(_ event: RelayEvent) {
        switch event {
        case .started:
            totals.active += 1
        case .ended(let relay, let reason):
            totals.active -= 1
            endedByReason[Self.slot(of: reason)] += 1
            totals.bytesUp += relay.bytesAToB
            totals.bytesDown += relay.bytesBToA
        case .retired(let set):
            sets[ObjectIdentifier(set)] = nil
        }
    }

    private static func slot(of reason: CloseReason) -> Int {
        switch reason {
        case .eof: return 0
        case .reset: return 1
        case .idleTimeout: return 2
        case .drainTimeout: return 3
        }
    }

    /// A connection that never became a relay: `refused` (a limit), `connect-failed`.
    func count(result: String) {
        totals.results[result, default: 0] += 1
    }

    /// UDP sessions count in `active` while they exist.
    func sessionOpened() { totals.active += 1 }

    /// A UDP session ended; its datagrams and bytes join the totals.
    func sessionClosed(result: String, bytesUp: UInt64, bytesDown: UInt64, datagramsUp: UInt64, datagramsDown: UInt64) {
        totals.active -= 1
        totals.results[result, default: 0] += 1
        totals.bytesUp += bytesUp
        totals.bytesDown += bytesDown
        totals.datagramsUp += datagramsUp
        totals.datagramsDown += datagramsDown
    }

    /// A datagram relayed by a service that counts each one as it passes (the tunnel's UDP
    /// services, whose datagrams ride a shared data channel): two additions on this loop.
    func countDatagram(up: Bool, bytes: Int) {
        if up {
            totals.datagramsUp += 1
            totals.bytesUp += UInt64(bytes)
        } else {
            totals.datagramsDown += 1
            totals.bytesDown += UInt64(bytes)
        }
    }

    func countDropped(_ count: Int, reason: String) {
        guard count > 0 else { return }
        totals.dropped[reason, default: 0] += UInt64(count)
    }

    /// The totals so far, with the bytes of relays still running.
    func sample() -> ServiceSample {
        var now = totals
        for (label, count) in zip(Self.reasonLabels, endedByReason) where count > 0 { now.results[label, default: 0] += count }
        for set in sets.values {
            let (up, down) = set.bytesInFlight
            now.bytesUp += up
            now.bytesDown += down
        }
        return now
    }
}

/// The counters of one command on one loop: a `ServiceMeter` per service name (a service
/// that comes back under the same name keeps counting on the same meter), failed
/// authentications and connect times.
///
/// Thread confinement: every method runs on `loop`; the owner may make its meters before
/// handing itself to the loop. Sendable so that a scrape can reach it on its loop.
final class LoopMeters: @unchecked Sendable {
    let loop: EventLoop
    private var services: [String: ServiceMeter] = [:]
    private var authFailures: [String: UInt64] = [:]
    private var connectDuration = Histogram()

    init(loop: EventLoop) {
        self.loop = loop
    }

    /// The meter of the service `name`, made on first use.
    func service(_ name: String, kind: String) -> ServiceMeter {
        if let known = services[name] { return known }
        let meter = ServiceMeter(kind: kind)
        services[name] = meter
        return meter
    }

    func countAuthFailure(reason: String) {
        authFailures[reason, default: 0] += 1
    }

    /// A dial that started at `since` has just connected. `since` may be another loop's
    /// reading of the same clock, taken in a turn that began after this loop's.
    func observeConnect(since: UInt64) {
        let now = loop.now
        connectDuration.observe(nanoseconds: now > since ? now - since : 0)
    }

    /// This loop's share of the command's metrics.
    func sample() -> MetricsSnapshot {
        loop.assertInLoop()
        var snapshot = MetricsSnapshot()
        for (name, meter) in services { snapshot.services[name] = meter.sample() }
        snapshot.authFailures = authFailures
        snapshot.connectDuration = connectDuration
        return snapshot
    }
}
