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
    private let active = Atomic<Int>(0)

    init(config: ProxyConfig, exit: ProxyExit, logger: Logger, refusals: RefusalSummary, maxConnections: Int) {
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
