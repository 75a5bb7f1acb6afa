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

    private static func signalReceived(_ signo: Int32, state: State, group: LoopGroup, drainTimeout: Duration, logger: Logger,
                                       hangupStops: Bool) {
        if signo == SIGHUP && !hangupStops {
            logger.notice("SIGHUP received; nothing to reload for this command")
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
