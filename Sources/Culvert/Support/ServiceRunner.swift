#if canImport(Glibc)
import Glibc
#endif
import Logging
import Reactor

/// A running feature (forwarder, tunnel end) that can finish its work and stop.
public protocol DrainableService: AnyObject {
    /// Stops taking new work, lets in-flight work finish, force-closes after `timeout`.
    func drain(timeout: Duration) async
}

/// A running service whose config file SIGHUP re-reads: `reload` applies the difference
/// and says what changed, or throws (a `ConfigError` naming file and key) and keeps the
/// running config untouched.
public protocol ReloadableService: DrainableService {
    /// The file re-read, as the reload's log line names it; nil when the command runs on
    /// flags alone, so SIGHUP has nothing to re-read.
    var configPath: String? { get }
    func reload() async throws -> ReloadReport
}

/// What a reload changed, for its one log line.
public struct ReloadReport: Sendable {
    public var added: [String] = []
    public var removed: [String] = []
    public var replaced: [String] = []
    /// Settings that changed and took effect.
    public var applied: [String] = []
    /// Settings that changed in the file but take effect only after a restart (kept).
    public var needsRestart: [String] = []
    /// Services of the new config that could not start (the rest was applied).
    public var failed: [String] = []

    public init() {}

    var metadata: Logger.Metadata {
        var m: Logger.Metadata = [:]
        for (key, items) in [("added", added), ("removed", removed), ("replaced", replaced), ("applied", applied), ("failed", failed)] where !items.isEmpty {
            m[key] = "\(items.joined(separator: ","))"
        }
        return m
    }
}

/// Lets a running service end the process (a fatal condition such as failed
/// authentication) with an exit status.
public struct ServiceControl: Sendable {
    let stop: @Sendable (Int32) -> Void
    /// Stops every loop; the process exits with `status`.
    public func exit(status: Int32) { stop(status) }
}

/// Runs a service on a loop group from start-up to exit: starts it with `async` code on
/// the main loop, turns SIGINT/SIGTERM into a graceful drain (a second signal exits at
/// once), and returns the process exit status. Around that it runs the admin endpoint
/// (`--admin`) and tells systemd (`NOTIFY_SOCKET`) when the service is ready and stopping.
public enum ServiceRunner {
    private final class State: @unchecked Sendable {
        var service: DrainableService?
        var admin: AdminEndpoint?
        var stopping = false
        var exitStatus: Int32 = 0
        /// A reload is running; a SIGHUP meanwhile asks for one more after it.
        var reloading = false
        var reloadAgain = false
    }

    /// - Parameter hangupStops: SIGHUP stops the command like SIGTERM (`pipe`: OpenSSH
    ///   sends it to its ProxyCommand when the session ends); otherwise it is logged.
    /// - Parameter admin: the admin endpoint to start once the service runs.
    public static func run(threads: Int, drainTimeout: Duration, logger: Logger, hangupStops: Bool = false,
                           admin: AdminSettings? = nil,
                           start: @escaping (LoopGroup, ServiceControl) async throws -> DrainableService) -> Int32 {
        let group: LoopGroup
        let signals: SignalSource
        if let (from, to) = DescriptorLimit.raise() {
            logger.debug("descriptor limit raised", metadata: ["from": "\(from)", "to": "\(to)"])
        }
        do {
            group = try LoopGroup(threads: threads)
            // Before any loop thread exists, so every thread inherits the blocked signals.
            let state = State()
            signals = try SignalSource(loop: group.main) { signo in
                signalReceived(signo, state: state, group: group, drainTimeout: drainTimeout, logger: logger,
                               hangupStops: hangupStops)
            }
            let control = ServiceControl { status in
                group.main.execute {
                    state.exitStatus = status
                    group.stop()
                }
            }
            Task(executorPreference: group.main.tasks) {
                do {
                    ProcessMetrics.markStarted()
                    let service = try await start(group, control)
                    state.service = service
                    if let admin, !state.stopping {
                        state.admin = try await AdminEndpoint.start(settings: admin, loop: group.main,
                                                                    source: service as? MetricsSource, logger: logger)
                    }
                    SystemdNotifier.current.ready()
                    if let interval = SystemdNotifier.watchdogInterval() { keepWatchdogFed(every: interval, on: group.main) }
                    if state.stopping {
                        await service.drain(timeout: drainTimeout)
                        group.stop()
                    }
                } catch {
                    logger.error("\(error)")
                    state.exitStatus = 1
                    group.stop()
                }
            }
            group.run()
            signals.close()
            return state.exitStatus
        } catch {
            logger.error("cannot start event loops: \(error)")
            return 1
        }
    }

    /// Runs one reload, then another if SIGHUP came meanwhile (the file may have changed
    /// again). The one place a reload's outcome is known: it is logged here.
    private static func reload(_ service: ReloadableService, config: String, state: State, group: LoopGroup, logger: Logger) {
        state.reloading = true
        state.reloadAgain = false
        logger.notice("SIGHUP received, reloading", metadata: ["config": "\(config)"])
        SystemdNotifier.current.reloading()
        Task(executorPreference: group.main.tasks) {
            do {
                let report = try await service.reload()
                reloaded(report, config: config, logger: logger)
                ProcessMetrics.recordReload(applied: true)
            } catch {
                reloadFailed(error, config: config, logger: logger)
                ProcessMetrics.recordReload(applied: false)
            }
            SystemdNotifier.current.ready()
            state.reloading = false
            if state.reloadAgain && !state.stopping { reload(service, config: config, state: state, group: group, logger: logger) }
        }
    }

    private static func reloaded(_ report: ReloadReport, config: String, logger: Logger) {
        for setting in report.needsRestart {
            logger.warning("config setting changed; it needs a restart, the running value is kept",
                           metadata: ["config": "\(config)", "key": "\(setting)"])
        }
        var metadata = report.metadata
        metadata["config"] = "\(config)"
        if report.failed.isEmpty {
            logger.notice("config reloaded", metadata: metadata)
        } else {
            logger.error("config reloaded in part: some services could not start", metadata: metadata)
        }
    }

    /// The file did not parse or validate: one line with the file, the key and the reason.
    private static func reloadFailed(_ error: any Error, config: String, logger: Logger) {
        var metadata: Logger.Metadata = ["config": "\(config)", "error": "\(error)"]
        if let error = error as? ConfigError, let key = error.key { metadata["key"] = "\(key)" }
        logger.error("config reload failed, keeping the running config", metadata: metadata)
    }

    private static func signalReceived(_ signo: Int32, state: State, group: LoopGroup, drainTimeout: Duration, logger: Logger,
                                       hangupStops: Bool) {
        if signo == SIGHUP && !hangupStops {
            guard let service = state.service as? ReloadableService, let path = service.configPath else {
                logger.notice("SIGHUP received; nothing to reload for this command")
                return
            }
            if state.stopping { return }
            if state.reloading {
                state.reloadAgain = true
                return
            }
            reload(service, config: path, state: state, group: group, logger: logger)
            return
        }
        let name = signo == SIGINT ? "SIGINT" : signo == SIGHUP ? "SIGHUP" : "SIGTERM"
        if state.stopping {
            logger.warning("\(name) received again, exiting without waiting")
            group.stop()
            return
        }
        state.stopping = true
        SystemdNotifier.current.stopping()
        logger.notice("\(name) received, shutting down")
        guard let service = state.service else { return }
        Task(executorPreference: group.main.tasks) {
            await service.drain(timeout: drainTimeout)
            group.stop()
        }
    }

    /// Sends `WATCHDOG=1` from the main loop every `interval`: a stuck main loop stops
    /// the pings, and systemd restarts the service.
    private static func keepWatchdogFed(every interval: Duration, on loop: EventLoop) {
        SystemdNotifier.current.watchdog()
        _ = loop.schedule(after: interval) { keepWatchdogFed(every: interval, on: loop) }
    }
}
