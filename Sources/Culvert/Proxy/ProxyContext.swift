import Logging
import Reactor
import Synchronization
import Transfer

/// What every loop of `culvert proxy` shares: the settings, the exit, the refusal
/// summary and the connection count. Immutable but for the atomic count.
final class ProxyContext: Sendable {
    let config: ProxyConfig
    let exit: ProxyExit
    let logger: Logger
    /// Refusals (policy, failed dials, bad handshakes, the limit), summarised per interval.
    let refusals: RefusalSummary
    let maxConnections: Int
    /// UDP ASSOCIATE; nil when the exit carries no datagrams (the command is refused).
    let udp: ProxyUDP?
    private let active = Atomic<Int>(0)

    init(config: ProxyConfig, exit: ProxyExit, logger: Logger, refusals: RefusalSummary, maxConnections: Int, udp: ProxyUDP? = nil) {
        self.udp = udp
        self.config = config
        self.exit = exit
        self.logger = logger
        self.refusals = refusals
        self.maxConnections = maxConnections
    }

    /// Client connections accepted and not yet closed, across all loops.
    var activeConnections: Int { active.load(ordering: .relaxed) }

    /// Counts a new connection; false when the limit is reached (the caller refuses it).
    func admit() -> Bool {
        if active.wrappingAdd(1, ordering: .relaxed).newValue > maxConnections {
            active.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    func release() { active.wrappingSubtract(1, ordering: .relaxed) }

    /// Logs a refused request in full unless the summary counts it instead.
    func refused(_ reason: String, _ message: String, _ peer: String, _ metadata: Logger.Metadata = [:]) {
        guard refusals.record(reason) else { return }
        var all = metadata
        all["peer"] = "\(peer)"
        all["reason"] = "\(reason)"
        logger.warning("\(message)", metadata: all)
    }
}

/// What the UDP associations of every loop share: the datagram exit, the loops'
/// datagram batches, the idle timeout and the association count with its cap.
final class ProxyUDP: Sendable {
    let exit: DatagramExit
    let batches: DatagramBatches
    let idleTimeout: Duration
    let maxAssociations: Int
    private let active = Atomic<Int>(0)

    init(exit: DatagramExit, batches: DatagramBatches, idleTimeout: Duration, maxAssociations: Int) {
        self.exit = exit
        self.batches = batches
        self.idleTimeout = idleTimeout
        self.maxAssociations = maxAssociations
    }

    /// Counts a new association; false when the cap is reached.
    func admit() -> Bool {
        if active.wrappingAdd(1, ordering: .relaxed).newValue > maxAssociations {
            active.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    func release() { active.wrappingSubtract(1, ordering: .relaxed) }
}
