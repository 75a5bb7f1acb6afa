import Logging
import Reactor
import Synchronization

/// Keeps the log readable while something is refused over and over (a flood, a
/// misconfigured peer retrying): the first few refusals after a quiet spell are logged
/// one by one, at once and with their detail; after that, one summary line per interval
/// gives the count of each reason, so a flood of any size costs a line per interval.
///
/// The caller asks `record` whether to log the refusal it is handling in full, and logs
/// it itself, so each refusal keeps its own message and metadata.
///
/// Thread safety: `record` may be called from any thread; the summary lines are logged
/// from `loop`, where the interval timer runs.
public final class RefusalSummary: Sendable {
    /// Where the summary stands: no refusal for a whole interval, or refusals still coming
    /// in (some logged in full, the rest counted for the next summary line).
    private enum Phase {
        case quiet
        case active(detailedLeft: Int, counts: [String: Int], refusedThisInterval: Bool)
    }

    private let logger: Logger
    private let message: String
    private let interval: Duration
    private let detailed: Int
    private let loop: EventLoop
    private let phase = Mutex(Phase.quiet)

    /// - Parameters:
    ///   - message: the summary line's message, e.g. "connections refused".
    ///   - detailed: refusals logged in full after a quiet spell before counting starts.
    ///   - loop: runs the interval timer and logs the summary lines.
    public init(logger: Logger, message: String, interval: Duration = .seconds(1), detailed: Int = 5, loop: EventLoop) {
        self.logger = logger
        self.message = message
        self.interval = interval
        self.detailed = detailed
        self.loop = loop
    }

    /// Counts one refusal for `reason` (a metadata key of the summary line, e.g.
    /// `limit`); true when the caller should log this one in full.
    public func record(_ reason: String) -> Bool {
        let (logInFull, startTimer): (Bool, Bool) = phase.withLock { phase in
            switch phase {
            case .quiet:
                phase = .active(detailedLeft: detailed - 1, counts: [:], refusedThisInterval: true)
                return (detailed > 0, true)
            case .active(let left, var counts, _):
                if left > 0 {
                    phase = .active(detailedLeft: left - 1, counts: counts, refusedThisInterval: true)
                    return (true, false)
                }
                counts[reason, default: 0] += 1
                phase = .active(detailedLeft: 0, counts: counts, refusedThisInterval: true)
                return (false, false)
            }
        }
        if startTimer {
            loop.execute { [self] in loop.schedule(after: interval) { [self] in intervalEnded() } }
        }
        return logInFull
    }

    /// Logs what was counted during the interval; after an interval with no refusal at
    /// all, the summary falls quiet and the next refusal is logged in full again.
    private func intervalEnded() {
        let counts: [String: Int]? = phase.withLock { phase in
            switch phase {
            case .quiet:
                return nil
            case .active(_, _, false):
                phase = .quiet
                return nil
            case .active(let left, let counts, true):
                phase = .active(detailedLeft: left, counts: [:], refusedThisInterval: false)
                return counts
            }
        }
        guard let counts else { return }
        if !counts.isEmpty {
            var metadata: Logger.Metadata = ["interval": .seconds(interval)]
            for (reason, n) in counts { metadata[reason] = .stringConvertible(n) }
            logger.warning("\(message)", metadata: metadata)
        }
        loop.schedule(after: interval) { [self] in intervalEnded() }
    }
}
