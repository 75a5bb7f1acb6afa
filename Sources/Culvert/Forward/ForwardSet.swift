import Logging
import Reactor

/// A forwarder of one listen address, as `ForwardSet` starts, replaces and drains it.
public protocol ForwardListener: DrainableService, MetricsSource {
    associatedtype Config: ForwardListenerConfig
    static func start(config: Config, group: LoopGroup, logger: Logger) async throws -> Self
}

/// One listener's settings: its key in a reload is its protocol and listen address.
public protocol ForwardListenerConfig: Equatable, Sendable {
    var listen: HostPort { get }
    /// `tcp` or `udp`.
    static var protocolName: String { get }
    /// Takes the process-wide settings (threads, drain timeout) of the running process,
    /// which a reload cannot change; returns the keys whose value differed.
    mutating func keepProcessSettings(of running: Self) -> [String]
}

extension TCPForwardConfig: ForwardListenerConfig {
    public static var protocolName: String { "tcp" }
    public mutating func keepProcessSettings(of running: TCPForwardConfig) -> [String] {
        var changed: [String] = []
        if threads != running.threads { changed.append("threads") }
        if drainTimeout != running.drainTimeout { changed.append("drain_timeout") }
        threads = running.threads
        drainTimeout = running.drainTimeout
        return changed
    }
}

extension UDPForwardConfig: ForwardListenerConfig {
    public static var protocolName: String { "udp" }
    public mutating func keepProcessSettings(of running: UDPForwardConfig) -> [String] {
        defer { threads = running.threads }
        return threads != running.threads ? ["threads"] : []
    }
}

extension TCPForwarder: ForwardListener {}
extension UDPForwarder: ForwardListener {}

/// The listeners of one `forward tcp|udp` process, keyed by protocol and listen address.
/// A reload starts the listeners the file added, drains those it removed (each stops
/// accepting at once; its connections finish, reset at the drain timeout) and replaces
/// the changed ones (the successor binds first, beside it with SO_REUSEPORT, so the
/// address never refuses); the others and their connections are not touched.
///
/// Thread confinement: `start`, `reload` and `drain` run on the main loop.
public final class ForwardSet<Listener: ForwardListener>: ReloadableService, MetricsSource, @unchecked Sendable {
    public typealias Config = Listener.Config
    private let group: LoopGroup
    private let logger: Logger
    /// The first listener's settings at start: the process-wide ones reloads keep.
    private let processSettings: Config
    private let drainTimeout: Duration
    private var running: [String: (config: Config, listener: Listener)] = [:]
    /// Listeners a reload removed or replaced, until their connections have ended.
    private var retiring: [Int: Task<Void, Never>] = [:]
    private var retireSerial = 0
    public let configPath: String?
    private let reread: @Sendable () throws(ConfigError) -> [Config]

    private init(group: LoopGroup, logger: Logger, processSettings: Config, drainTimeout: Duration, configPath: String?,
                 reread: @escaping @Sendable () throws(ConfigError) -> [Config]) {
        self.group = group
        self.logger = logger
        self.processSettings = processSettings
        self.drainTimeout = drainTimeout
        self.configPath = configPath
        self.reread = reread
    }

    /// The key a reload knows a listener by: `tcp 127.0.0.1:8080`.
    static func key(_ config: Config) -> String { "\(Config.protocolName) \(config.listen)" }

    /// The listener serving `listen` (tests and the ready lines' port 0).
    public func listener(at listen: HostPort) -> Listener? {
        running.values.first { $0.config.listen == listen }?.listener
    }

    /// Starts every listener (all or nothing: a failure stops those started and throws).
    /// - Parameter reread: the command's resolution again, run on SIGHUP; with no
    ///   `configPath` there is nothing to re-read and SIGHUP is only logged.
    public static func start(configs: [Config], drainTimeout: Duration, group: LoopGroup, logger: Logger, configPath: String?,
                             reread: @escaping @Sendable () throws(ConfigError) -> [Config]) async throws -> ForwardSet {
        let set = ForwardSet(group: group, logger: logger, processSettings: configs[0], drainTimeout: drainTimeout,
                             configPath: configPath, reread: reread)
        for config in configs {
            do {
                set.running[key(config)] = (config, try await Listener.start(config: config, group: group, logger: logger))
            } catch {
                await set.drain(timeout: .zero)
                throw error
            }
        }
        return set
    }

    public func reload() async throws -> ReloadReport {
        var configs = try reread()
        var report = ReloadReport()
        var restart: Set<String> = []
        for i in configs.indices { restart.formUnion(configs[i].keepProcessSettings(of: processSettings)) }
        report.needsRestart = restart.sorted()
        let diff = ServiceDiff(running: running.mapValues(\.config),
                               new: Dictionary(configs.map { (Self.key($0), $0) }, uniquingKeysWith: { first, _ in first }))
        for (key, _) in diff.removed {
            retire(running.removeValue(forKey: key)!.listener, key: key, why: "removed")
            report.removed.append(key)
        }
        for (key, config) in diff.added {
            do {
                running[key] = (config, try await Listener.start(config: config, group: group, logger: logger))
                report.added.append(key)
            } catch {
                logger.error("cannot start listener", metadata: ["listen": "\(key)", "error": "\(error)"])
                report.failed.append(key)
            }
        }
        for (key, _, config) in diff.changed {
            do {
                let successor = try await Listener.start(config: config, group: group, logger: logger)
                retire(running[key]!.listener, key: key, why: "replaced")
                running[key] = (config, successor)
                report.replaced.append(key)
            } catch {
                logger.error("cannot start the changed listener; the running one stays", metadata: ["listen": "\(key)", "error": "\(error)"])
                report.failed.append(key)
            }
        }
        return report
    }

    /// Stops the listener accepting and lets its connections finish in the background.
    private func retire(_ listener: Listener, key: String, why: String) {
        logger.notice("listener \(why), draining its connections", metadata: ["listen": "\(key)"])
        retireSerial += 1
        let serial = retireSerial
        retiring[serial] = Task(executorPreference: group.main.tasks) { [drainTimeout] in
            await listener.drain(timeout: drainTimeout)
            await self.settleLoops()
            self.retiring[serial] = nil
        }
    }

    /// Returns once every loop has run what it had queued: callbacks of a drained listener
    /// already on their way (its workers hold it unowned) have run, so it may go.
    private func settleLoops() async {
        for loop in group.loops {
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in loop.execute { done.resume() } }
        }
    }

    /// Every running listener's counters (a listener a reload removed takes its own along).
    public func gatherMetrics() async -> MetricsSnapshot {
        var all = MetricsSnapshot()
        for entry in running.values { all.add(await entry.listener.gatherMetrics()) }
        return all
    }

    /// Drains every listener at once, and waits for those a reload retired.
    public func drain(timeout: Duration) async {
        // The listeners stay referenced until the process ends: a loop may still run a
        // late callback of theirs after their drain returned.
        let listeners = running.values.map(\.listener)
        let retired = Array(retiring.values)
        await withTaskGroup(of: Void.self) { tasks in
            for l in listeners {
                tasks.addTask(executorPreference: group.main.tasks) { await l.drain(timeout: timeout) }
            }
        }
        for task in retired { await task.value }
    }
}
