import Reactor
import Synchronization

/// What the whole process counts, whichever command runs: its version, when it started,
/// and the config reloads (rare events, so atomics are fine here).
public enum ProcessMetrics {
    /// The version `culvert --version` prints and `culvert_build_info` carries.
    public static let version = "0.1.0"

    private static let reloadsApplied = Atomic<UInt64>(0)
    private static let reloadsFailed = Atomic<UInt64>(0)
    private static let startedAt = Atomic<UInt64>(0)

    /// Marks the start of the process's service (uptime counts from here).
    static func markStarted() {
        startedAt.store(MonotonicClock.now(), ordering: .relaxed)
    }

    /// Counts a config reload: applied (the config generation goes up by one) or failed
    /// (the old config keeps running). For the reload work (SIGHUP).
    public static func recordReload(applied: Bool) {
        if applied {
            reloadsApplied.wrappingAdd(1, ordering: .relaxed)
        } else {
            reloadsFailed.wrappingAdd(1, ordering: .relaxed)
        }
    }

    /// 1 for the config the process started with, one more per applied reload.
    public static var configGeneration: UInt64 { 1 + reloadsApplied.load(ordering: .relaxed) }

    static var reloads: (applied: UInt64, failed: UInt64) {
        (reloadsApplied.load(ordering: .relaxed), reloadsFailed.load(ordering: .relaxed))
    }

    static var uptimeSeconds: Double {
        let start = startedAt.load(ordering: .relaxed)
        return start == 0 ? 0 : Double(MonotonicClock.now() &- start) / 1e9
    }
}
