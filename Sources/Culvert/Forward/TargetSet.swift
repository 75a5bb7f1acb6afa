import Reactor
import Synchronization
import Transfer

/// How a new connection picks among several targets.
public enum BalanceStrategy: String, CaseIterable, Sendable {
    /// Each new connection starts at the next target.
    case roundRobin = "round-robin"
    /// Each new connection starts at a random target.
    case random
    /// Always the first healthy target, in the order given: failover.
    case first
}

/// The targets of one forwarder with their health, shared by every loop.
///
/// A target that refuses or times out is marked down for a backoff that doubles with
/// each consecutive failure (1 s up to 60 s). Down targets are tried last, not skipped:
/// when everything is marked down, trying beats refusing a client outright.
public final class TargetSet: Sendable {
    public struct Target: Sendable {
        public let spec: HostPort
        public let addresses: [SocketAddress]
    }

    /// One address to try, with the target it belongs to.
    public struct Attempt: Sendable {
        public let target: Int
        public let address: SocketAddress
    }

    /// The addresses one new connection tries, best first: `addresses[i]` is
    /// `attempts[i].address`, the list a `Connector` takes.
    public struct Plan: Sendable {
        public let attempts: [Attempt]
        public let addresses: [SocketAddress]

        init(_ attempts: [Attempt]) {
            self.attempts = attempts
            addresses = attempts.map(\.address)
        }
    }

    private final class Health: Sendable {
        let downUntil = Atomic<UInt64>(0)
        let failures = Atomic<Int>(0)
    }

    public let targets: [Target]
    public let strategy: BalanceStrategy
    private let health: [Health]
    private let cursor = Atomic<Int>(0)
    /// The plan for each first target while every target is up (the usual case), built
    /// once so that a connection does not build two arrays; empty for target lists too
    /// long to keep every rotation of.
    private let healthyPlans: [Plan]
    static let maxPrecomputedAttempts = 1024
    static let baseBackoff: UInt64 = 1_000_000_000
    static let maxBackoff: UInt64 = 60_000_000_000

    public init(targets: [Target], strategy: BalanceStrategy) {
        precondition(!targets.isEmpty)
        self.targets = targets
        self.strategy = strategy
        health = targets.map { _ in Health() }
        let addressCount = targets.reduce(0) { $0 + $1.addresses.count }
        healthyPlans = targets.count * addressCount > Self.maxPrecomputedAttempts ? []
            : (0..<targets.count).map { start in Plan(Self.rotation(of: targets, from: start)) }
    }

    /// The addresses to try for one new connection, best first.
    public func attempts(now: UInt64) -> [Attempt] { plan(now: now).attempts }

    /// `attempts(now:)` with the addresses alongside.
    public func plan(now: UInt64) -> Plan {
        let n = targets.count
        let start: Int
        switch strategy {
        case .first: start = 0
        case .roundRobin: start = cursor.wrappingAdd(1, ordering: .relaxed).oldValue % n
        case .random: start = Int.random(in: 0..<n)
        }
        if !healthyPlans.isEmpty && !health.contains(where: { $0.downUntil.load(ordering: .relaxed) > now }) {
            return healthyPlans[start]
        }
        var up: [Attempt] = []
        var down: [Attempt] = []
        for k in 0..<n {
            let i = (start + k) % n
            let isDown = health[i].downUntil.load(ordering: .relaxed) > now
            for address in targets[i].addresses {
                if isDown { down.append(Attempt(target: i, address: address)) }
                else { up.append(Attempt(target: i, address: address)) }
            }
        }
        return Plan(up + down)
    }

    /// Every address, targets taken in order from `start`.
    private static func rotation(of targets: [Target], from start: Int) -> [Attempt] {
        (0..<targets.count).flatMap { k in
            let i = (start + k) % targets.count
            return targets[i].addresses.map { Attempt(target: i, address: $0) }
        }
    }

    /// Records a failed connect; returns the backoff the target is now down for.
    @discardableResult
    public func markDown(_ target: Int, now: UInt64) -> UInt64 {
        let failures = health[target].failures.wrappingAdd(1, ordering: .relaxed).newValue
        let backoff = min(Self.baseBackoff << UInt64(min(failures - 1, 6)), Self.maxBackoff)
        health[target].downUntil.store(now &+ backoff, ordering: .relaxed)
        return backoff
    }

    public func markUp(_ target: Int) {
        if health[target].failures.load(ordering: .relaxed) != 0 {
            health[target].failures.store(0, ordering: .relaxed)
            health[target].downUntil.store(0, ordering: .relaxed)
        }
    }

    public func isDown(_ target: Int, now: UInt64) -> Bool {
        health[target].downUntil.load(ordering: .relaxed) > now
    }

    /// `127.0.0.1:8080,[::1]:9000`: how ready lines name the targets.
    public var summary: String { targets.map(\.spec.description).joined(separator: ",") }
}
/// Resolves a forwarder's targets off-loop; a target written without a host means this host.
func resolveTargets(_ specs: [HostPort], on loop: EventLoop) async throws -> [TargetSet.Target] {
    var resolved: [TargetSet.Target] = []
    for spec in specs {
        let addresses = try await Resolver.resolve(host: spec.host ?? "127.0.0.1", port: spec.port, passive: false, on: loop)
        resolved.append(TargetSet.Target(spec: spec, addresses: addresses))
    }
    return resolved
}
