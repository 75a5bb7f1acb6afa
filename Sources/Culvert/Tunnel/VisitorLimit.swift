import Logging
import Synchronization

/// How many visitors one TCP or secret service of `culvert client` relays at once, on
/// every loop together (`--max-visitors`).
///
/// Each visitor costs the client a connection to the local service, and without
/// multiplexing a data channel too; anyone who can reach the public port can open
/// visitors by the thousand. Without a limit one flooded service takes every descriptor
/// and the others fail with EMFILE. The default gives each service an equal share of
/// the descriptors free at start, less a reserve for what the session needs whatever
/// the visitors do (control channel, carriers, pooled channels, reconnects, splice pipes)
/// and less what the UDP services' session limits may take. A flood then meets the
/// limit, is refused and counted, and leaves the other services their share.
final class VisitorLimit: Sendable {
    /// 0: no limit.
    let max: Int
    private let count = Atomic<Int>(0)

    init(max: Int) {
        self.max = max
    }

    /// Takes a place for a new visitor; false (nothing taken) at the limit.
    func admit() -> Bool {
        guard max > 0 else { return true }
        let now = count.wrappingAdd(1, ordering: .relaxed).newValue
        if now <= max { return true }
        count.wrappingSubtract(1, ordering: .relaxed)
        return false
    }

    /// Gives back the place `admit` took, once the visitor's relay ended or never started.
    func release() {
        guard max > 0 else { return }
        count.wrappingSubtract(1, ordering: .relaxed)
    }

    /// Descriptors kept for the session whatever its visitors take: the control channel,
    /// a reconnect, the carriers, the pooled and opening data channels
    /// (`ClientSession.channelsOpeningMax`), splice pipes and the odd log or resolver file.
    static func reserve(_ config: TunnelClientConfig) -> Int {
        64 + config.pool + config.mux
    }

    /// The default limit of each of `services` TCP or secret services, when `free`
    /// descriptors are left, `udpSessions` of them may go to UDP services, and a visitor
    /// costs `perVisitor`; never 0, which means no limit.
    static func defaultLimit(freeDescriptors free: Int, reserve: Int, udpSessions: Int, services: Int, perVisitor: Int) -> Int {
        let shared = free - reserve - udpSessions
        return Swift.max(1, shared / Swift.max(1, services) / Swift.max(1, perVisitor))
    }

    /// One limit per TCP or secret service of `config`, by service id, each logged once.
    static func make(config: TunnelClientConfig, udpMaxSessions: Int, logger: Logger) -> [UInt32: VisitorLimit] {
        let services = config.services.filter { $0.kind != .udp }
        guard !services.isEmpty else { return [:] }
        let free = UDPSessionBudget.freeDescriptors()
        let udpServices = config.services.count - services.count
        // A UDP service without a limit may take what the UDP default would have.
        let perUDP = udpMaxSessions > 0 ? udpMaxSessions : UDPSessionBudget.defaultLimit(freeDescriptors: free, sharedBy: udpServices)
        let reserve = reserve(config)
        let perVisitor = config.mux > 0 ? 1 : 2
        let limit = config.maxVisitors ?? defaultLimit(freeDescriptors: free, reserve: reserve, udpSessions: udpServices * perUDP,
                                                       services: services.count, perVisitor: perVisitor)
        let metadata: Logger.Metadata = [
            "max_visitors": .stringConvertible(limit), "free_descriptors": .stringConvertible(free),
            "reserve": .stringConvertible(reserve), "services": .stringConvertible(services.count),
            "from": config.maxVisitors == nil ? "default" : "--max-visitors",
        ]
        logger.info("TCP visitor limit", metadata: metadata)
        if limit == 0 || limit * services.count * perVisitor > free - reserve {
            logger.warning("TCP visitor limit exceeds free descriptors", metadata: metadata)
        }
        return Dictionary(uniqueKeysWithValues: services.map { ($0.id, VisitorLimit(max: limit)) })
    }

    /// `limits` with one for each TCP or secret service of `current` that has none (a
    /// reload added it under a new id): the share the others got at start, or, when none
    /// had one, the default for the services running now. Limits of services gone are
    /// dropped; their running visitors keep theirs.
    static func updated(_ limits: [UInt32: VisitorLimit], for current: [ServiceSpec], config: TunnelClientConfig,
                        udpMaxSessions: Int, logger: Logger) -> [UInt32: VisitorLimit] {
        let missing = current.filter { $0.kind != .udp && limits[$0.id] == nil }
        var kept = limits.filter { id, _ in current.contains { $0.id == id } }
        guard !missing.isEmpty else { return kept }
        if let share = limits.values.first?.max {
            for spec in missing { kept[spec.id] = VisitorLimit(max: share) }
            return kept
        }
        var now = config
        now.services = current
        let fresh = make(config: now, udpMaxSessions: udpMaxSessions, logger: logger)
        for spec in missing { kept[spec.id] = fresh[spec.id] }
        return kept
    }
}
