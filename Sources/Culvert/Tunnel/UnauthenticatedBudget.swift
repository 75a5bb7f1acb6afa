#if canImport(Glibc)
import Glibc
#endif
import Reactor
import Synchronization
import Transfer

/// Where a connection comes from, as far as budgets are concerned: an IPv4 address, or
/// the /64 prefix of an IPv6 one (one host or LAN usually holds a whole /64, so counting
/// single IPv6 addresses would give one attacker billions of "sources").
enum SourceAddress: Hashable, Sendable {
    case v4(UInt32)
    case v6(UInt64)

    init(_ address: SocketAddress) {
        switch address {
        case .v4(let a):
            self = .v4(UInt32(bigEndian: a.sin_addr.s_addr))
        case .v6(let a):
            let bytes = withUnsafeBytes(of: a.sin6_addr) { Array($0) }
            // An IPv4 client of a dual-stack listener (::ffff:a.b.c.d) is that IPv4 address.
            if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xff && bytes[11] == 0xff {
                self = .v4(bytes[12...].reduce(0) { $0 << 8 | UInt32($1) })
            } else {
                self = .v6(bytes[0..<8].reduce(0) { $0 << 8 | UInt64($1) })
            }
        }
    }
}

/// One accepted connection that has not authenticated yet: where it came from, which
/// budget it counts against, and how to end it early when a connection from a quieter
/// address takes its place.
///
/// Thread confinement: `source`, `lane` and `loop` are fixed; the rest is touched on
/// `loop` only (`displace` hops there).
final class PendingHandshake: @unchecked Sendable {
    /// What the connection is doing, as far as being displaced goes.
    private enum State {
        case accepted
        case handshaking(AsyncDuplex)
        case displaced
        case finished
    }

    let source: SourceAddress
    let lane: UnauthenticatedBudget.Lane
    let loop: EventLoop
    private var state = State.accepted

    init(source: SourceAddress, lane: UnauthenticatedBudget.Lane, loop: EventLoop) {
        self.source = source
        self.lane = lane
        self.loop = loop
    }

    /// The handshake runs on `channel`; false when the connection was displaced before.
    func started(_ channel: AsyncDuplex) -> Bool {
        loop.assertInLoop()
        guard case .accepted = state else { return false }
        state = .handshaking(channel)
        return true
    }

    /// The handshake is over (authenticated, handed on or failed); displacing it now does nothing.
    func finished() {
        loop.assertInLoop()
        if case .displaced = state { return }
        state = .finished
    }

    var wasDisplaced: Bool {
        loop.assertInLoop()
        if case .displaced = state { return true }
        return false
    }

    /// Ends the handshake: its place in the budget already went to another connection.
    fileprivate func displace() {
        loop.execute { [self] in
            switch state {
            case .accepted:
                state = .displaced
            case .handshaking(let channel):
                state = .displaced
                channel.fail(.closed)
            case .displaced, .finished:
                break
            }
        }
    }
}

/// How many connections may be in their handshake at once, shared by every loop of a
/// server. Accepting costs an attacker one TCP connection each, so the budget decides who
/// gets in when someone holds many open and silent:
///
/// - Addresses with a live authenticated session get a lane of their own, the same size
///   as the main one and without the per-address cap. Their new connections are nearly
///   always data channels that visitors are waiting for, and a data channel stuck behind
///   a flood from elsewhere would break services that already work; an address can only
///   reach this lane by proving the token once. A lane of its own (rather than a share
///   of the main one) keeps `--max-unauthenticated` meaning what it always meant for
///   everyone else, and keeps a burst of data channels from crowding out new clients.
/// - Every other address may hold at most `perSource` connections in their handshake.
/// - When the main lane is full, a connection from an address holding at least two
///   fewer than the address holding the most takes the place of that address's oldest
///   connection. A few addresses holding many connections can then never keep a new
///   client out; only an attacker with about as many addresses as the lane has places
///   can, and the per-address cap is what makes that cost real.
///
/// Thread safety: one lock over all of it; used once per accepted connection and
/// once per handshake end, never per byte.
final class UnauthenticatedBudget: Sendable {
    /// Which budget a connection counts against.
    enum Lane: Sendable {
        case main
        case sessionAddress
    }

    /// Why a connection was refused; the raw value names it in log lines.
    enum Refusal: String {
        case limit
        case perSource = "per_source"
    }

    /// What `admit` decided.
    enum Admission {
        case admitted(PendingHandshake)
        case refused(Refusal)
    }

    private struct State {
        var sessionLane = 0
        var mainLane = 0
        /// The main lane's connections per address, oldest first; an address leaves when
        /// its last connection does, so this never holds more than `max` addresses.
        var pending: [SourceAddress: [PendingHandshake]] = [:]
        /// Live authenticated sessions per address.
        var sessions: [SourceAddress: Int] = [:]
    }

    let max: Int
    let perSource: Int
    private let state = Mutex(State())

    init(max: Int, perSource: Int) {
        self.max = max
        self.perSource = perSource
    }

    /// Admits a connection from `source` accepted on `loop`, or says why not. When it
    /// takes another connection's place, that one is ended on its own loop.
    func admit(_ source: SourceAddress, on loop: EventLoop) -> Admission {
        let (admission, displaced): (Admission, PendingHandshake?) = state.withLock { s in
            if s.sessions[source, default: 0] > 0 {
                guard s.sessionLane < max else { return (.refused(.limit), nil) }
                s.sessionLane += 1
                return (.admitted(PendingHandshake(source: source, lane: .sessionAddress, loop: loop)), nil)
            }
            let mine = s.pending[source]?.count ?? 0
            guard mine < perSource else { return (.refused(.perSource), nil) }
            let admitted = PendingHandshake(source: source, lane: .main, loop: loop)
            guard s.mainLane >= max else {
                s.mainLane += 1
                s.pending[source, default: []].append(admitted)
                return (.admitted(admitted), nil)
            }
            guard let (heaviest, theirs) = s.pending.max(by: { $0.value.count < $1.value.count }),
                  theirs.count > mine + 1 else { return (.refused(.limit), nil) }
            let victim = s.pending[heaviest]!.removeFirst()
            s.pending[source, default: []].append(admitted)
            return (.admitted(admitted), victim)
        }
        displaced?.displace()
        return admission
    }

    /// The connection's handshake ended, however it went; its place is free again
    /// (unless it was displaced, and its place already taken).
    func release(_ connection: PendingHandshake) {
        state.withLock { s in
            switch connection.lane {
            case .sessionAddress:
                s.sessionLane -= 1
            case .main:
                guard var mine = s.pending[connection.source],
                      let i = mine.firstIndex(where: { $0 === connection }) else { return }
                mine.remove(at: i)
                s.pending[connection.source] = mine.isEmpty ? nil : mine
                s.mainLane -= 1
            }
        }
    }

    /// An authenticated session from `source` began: its later connections use the
    /// session lane.
    func sessionStarted(_ source: SourceAddress) {
        state.withLock { $0.sessions[source, default: 0] += 1 }
    }

    func sessionEnded(_ source: SourceAddress) {
        state.withLock { s in
            let left = s.sessions[source, default: 1] - 1
            s.sessions[source] = left > 0 ? left : nil
        }
    }
}
