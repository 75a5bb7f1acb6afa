#if canImport(Glibc)
import Glibc
#endif
import Logging
import Reactor
import Transfer

/// Server side of a UDP service exposed through the tunnel: the public UDP sockets and
/// the data channel that carries their datagrams, framed with each visitor's address,
/// to the client and back. Every datagram and drop counts on the service's meter.
///
/// Thread confinement: lives on the server's loop.
final class ServerUDPService: EventHandler {
    let id: UInt32
    private let loop: EventLoop
    private let logger: Logger
    private let batch: DatagramBatch
    private let meter: ServiceMeter
    private var listeners: [(fd: Int32, address: SocketAddress, registration: Registration?)] = []
    private var channel: DatagramChannel?
    /// Datagrams that arrive while no data channel is attached (right after the service
    /// is exposed, or while a lost channel is replaced) wait here, within bounds.
    private var waiting: [(SocketAddress, [UInt8])] = []
    private var waitingBytes = 0
    private static let waitingLimit = (count: 1024, bytes: 4 << 20)
    /// Datagrams dropped because the waiting queue was full.
    private(set) var droppedWithoutChannel = 0
    private let onChannelLost: (ServerUDPService) -> Void

    init(id: UInt32, loop: EventLoop, logger: Logger, batch: DatagramBatch, meter: ServiceMeter,
         onChannelLost: @escaping (ServerUDPService) -> Void) {
        self.id = id
        self.loop = loop
        self.logger = logger
        self.batch = batch
        self.meter = meter
        self.onChannelLost = onChannelLost
    }

    var listen: String { listeners.map { $0.address.description }.joined(separator: ",") }

    func start(_ sockets: [(Int32, SocketAddress)]) throws(SystemError) {
        for (i, (fd, address)) in sockets.enumerated() {
            listeners.append((fd, address, nil))
            listeners[i].registration = try loop.register(fd: fd, interest: .read, handler: self, tag: UInt8(i))
        }
    }

    func attach(_ stream: Duplex) {
        let channel = DatagramChannel(loop: loop, stream: stream,
            onDatagram: { [unowned self] peer, payload in reply(payload, to: peer) },
            onClose: { [weak self] error in
                guard let self else { return }
                self.channel = nil
                if let error { self.logger.warning("UDP data channel lost", metadata: ["listen": "\(self.listen)", "error": "\(error)"]) }
                self.onChannelLost(self)
            })
        do {
            try channel.start()
            self.channel = channel
        } catch {
            channel.close(.io(error))
            return
        }
        for (peer, payload) in waiting {
            payload.withUnsafeBytes { sendUp($0, from: peer, on: channel) }
        }
        waiting.removeAll()
        waitingBytes = 0
    }

    func handleEvents(_ events: UInt32, tag: UInt8) {
        // A read deferred to the next turn may find the service closed meanwhile.
        guard Int(tag) < listeners.count else { return }
        let fd = listeners[Int(tag)].fd
        for _ in 0..<8 {
            guard let n = try? batch.receive(from: fd), n > 0 else { return }
            for i in 0..<n {
                guard let peer = batch.address(i) else { continue }
                if batch.isTruncated(i) {
                    meter.countDropped(1, reason: "oversized")
                } else if let channel {
                    sendUp(batch.payload(i), from: peer, on: channel)
                } else if waiting.count < Self.waitingLimit.count && waitingBytes < Self.waitingLimit.bytes {
                    waiting.append((peer, Array(batch.payload(i))))
                    waitingBytes += batch.length(i)
                } else {
                    droppedWithoutChannel += 1
                    meter.countDropped(1, reason: "no_channel")
                }
            }
            if n < batch.capacity { return }
        }
        loop.deferTask { [weak self] in self?.handleEvents(0, tag: tag) }
    }

    private func sendUp(_ payload: UnsafeRawBufferPointer, from peer: SocketAddress, on channel: DatagramChannel) {
        if channel.send(payload, peer: peer) {
            meter.countDatagram(up: true, bytes: payload.count)
        } else {
            meter.countDropped(1, reason: "channel_full")
        }
    }

    private func reply(_ payload: UnsafeRawBufferPointer, to peer: SocketAddress) {
        guard let listener = listeners.first(where: { $0.address.family == peer.family }) else { return }
        let sent = try? peer.withSockAddr { (sa, len) throws(SystemError) in
            sendto(listener.fd, payload.baseAddress, payload.count, Int32(MSG_DONTWAIT), sa, len)
        }
        if let sent, sent >= 0 {
            meter.countDatagram(up: false, bytes: payload.count)
        } else {
            meter.countDropped(1, reason: "socket_full")
        }
    }

    func close() {
        let droppedOnChannel = channel?.dropped ?? 0
        if droppedWithoutChannel + droppedOnChannel > 0 {
            logger.warning("UDP datagrams dropped", metadata: [
                "listen": "\(listen)", "no_channel": .stringConvertible(droppedWithoutChannel),
                "channel_full": .stringConvertible(droppedOnChannel),
            ])
        }
        channel?.close()
        channel = nil
        for l in listeners {
            if let r = l.registration { loop.deregister(fd: l.fd, registration: r) }
            Posix.close(l.fd)
        }
        listeners.removeAll()
    }
}

/// Client side of a UDP service: datagrams from the data channel go to the local
/// service through one connected socket per visitor (a session, closed after the idle
/// timeout), and replies go back framed with that visitor's address.
///
/// Visitor addresses cost a sender nothing (they can be spoofed), so sessions are capped
/// (`maxSessions`, 0: no cap): datagrams from new visitors beyond the cap, or whose
/// session socket finds no descriptor, are dropped and counted, and the counts are
/// logged at most once per `reportInterval`, so a flood takes neither the descriptors the
/// other services need nor the log. Datagrams, sessions and drops count on the
/// service's meter as they happen.
///
/// Thread confinement: lives on the client's loop.
final class ClientUDPRelay {
    private final class Session: EventHandler {
        let visitor: SocketAddress
        let fd: Int32
        var registration: Registration?
        var lastActivity: UInt64
        unowned let relay: ClientUDPRelay
        init(visitor: SocketAddress, fd: Int32, now: UInt64, relay: ClientUDPRelay) {
            self.visitor = visitor
            self.fd = fd
            self.lastActivity = now
            self.relay = relay
        }
        func handleEvents(_ events: UInt32, tag: UInt8) { relay.repliesReady(self) }
    }

    /// Datagrams dropped since the last report, by reason.
    private struct Drops {
        /// A new visitor found `maxSessions` sessions open.
        var sessionLimit = 0
        /// A new visitor's session socket failed for want of descriptors or socket memory.
        var noDescriptor = 0
        /// No session socket could be opened for another reason.
        var unreachable = 0
        /// The last of those reasons.
        var unreachableError: SystemError?

        var isEmpty: Bool { sessionLimit == 0 && noDescriptor == 0 && unreachable == 0 }
    }

    static let reportInterval: Duration = .seconds(1)

    private let loop: EventLoop
    private let logger: Logger
    private let service: String
    private let target: [SocketAddress]
    private let idleTimeout: Duration
    private let maxSessions: Int
    private let meter: ServiceMeter
    private var channel: DatagramChannel!
    private var sessions: [SocketAddress: Session] = [:]
    private var sweep: LoopTimer?
    private var buffer = [UInt8](repeating: 0, count: 65536)
    private var drops = Drops()
    private var lastReport: UInt64?
    private var reportTimer: LoopTimer?
    private var finished = false
    private let onClose: (ClientUDPRelay) -> Void

    init(loop: EventLoop, logger: Logger, service: String, stream: Duplex, target: [SocketAddress], idleTimeout: Duration,
         maxSessions: Int, meter: ServiceMeter, onClose: @escaping (ClientUDPRelay) -> Void) {
        self.loop = loop
        self.meter = meter
        self.logger = logger
        self.service = service
        self.target = target
        self.idleTimeout = idleTimeout
        self.maxSessions = maxSessions
        self.onClose = onClose
        channel = DatagramChannel(loop: loop, stream: stream,
            onDatagram: { [unowned self] visitor, payload in forward(payload, from: visitor) },
            onClose: { [unowned self] _ in closeAll() })
    }

    /// The session cap of each UDP service: `config.udpMaxSessions`, or an equal share of
    /// `UDPSessionBudget`'s default taken from the descriptors free now (call it at start,
    /// before any session holds one). Logged once when there are UDP services.
    static func sessionLimit(config: TunnelClientConfig, logger: Logger) -> Int {
        let services = config.services.filter { $0.kind == .udp }.count
        guard services > 0 else { return config.udpMaxSessions ?? 0 }
        let free = UDPSessionBudget.freeDescriptors()
        let limit = config.udpMaxSessions ?? UDPSessionBudget.defaultLimit(freeDescriptors: free, sharedBy: services)
        let metadata: Logger.Metadata = [
            "max_sessions": .stringConvertible(limit), "free_descriptors": .stringConvertible(free),
            "services": .stringConvertible(services), "from": config.udpMaxSessions == nil ? "default" : "--udp-max-sessions",
        ]
        logger.info("UDP session limit", metadata: metadata)
        if limit == 0 || limit * services > free {
            logger.warning("UDP session limit exceeds free descriptors", metadata: metadata)
        }
        return limit
    }

    func start() throws(SystemError) {
        try channel.start()
        scheduleSweep()
    }

    private func forward(_ payload: UnsafeRawBufferPointer, from visitor: SocketAddress) {
        guard let session = sessions[visitor] ?? open(visitor) else { return }
        session.lastActivity = loop.now
        if send(session.fd, payload.baseAddress, payload.count, Int32(MSG_DONTWAIT)) >= 0 {
            meter.countDatagram(up: true, bytes: payload.count)
        } else {
            meter.countDropped(1, reason: "socket_full")
        }
    }

    private func open(_ visitor: SocketAddress) -> Session? {
        if maxSessions > 0 && sessions.count >= maxSessions {
            drops.sessionLimit += 1
            meter.countDropped(1, reason: "session_limit")
            report()
            return nil
        }
        var failure: SystemError?
        for address in target {
            do throws(SystemError) {
                let fd = try Net.udpConnect(address, bufferSize: 1 << 20)
                let session = Session(visitor: visitor, fd: fd, now: loop.now, relay: self)
                do {
                    session.registration = try loop.register(fd: fd, interest: .read, handler: session)
                } catch {
                    Posix.close(fd)
                    throw error
                }
                sessions[visitor] = session
                meter.sessionOpened()
                return session
            } catch {
                failure = error
                if UDPSessionBudget.isOutOfResources(error.errno) { break }
            }
        }
        if let failure, UDPSessionBudget.isOutOfResources(failure.errno) {
            drops.noDescriptor += 1
            meter.countDropped(1, reason: "no_descriptor")
        } else {
            drops.unreachable += 1
            drops.unreachableError = failure
            meter.countDropped(1, reason: "unreachable")
        }
        report()
        return nil
    }

    private func repliesReady(_ session: Session) {
        while session.registration != nil {
            let n = buffer.withUnsafeMutableBytes { recv(session.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { return }
                // ICMP from the local service (ECONNREFUSED): end this visitor's session.
                return close(session, .targetError)
            }
            session.lastActivity = loop.now
            if buffer.withUnsafeBytes({ channel.send(UnsafeRawBufferPointer(rebasing: $0[0..<n]), peer: session.visitor) }) {
                meter.countDatagram(up: false, bytes: n)
            } else {
                meter.countDropped(1, reason: "channel_full")
            }
        }
    }

    private func close(_ session: Session, _ end: UDPSessionEnd) {
        guard let r = session.registration else { return }
        loop.deregister(fd: session.fd, registration: r)
        session.registration = nil
        Posix.close(session.fd)
        sessions[session.visitor] = nil
        // Its datagrams and bytes counted as they passed.
        meter.sessionClosed(result: end.rawValue, bytesUp: 0, bytesDown: 0, datagramsUp: 0, datagramsDown: 0)
    }

    private func scheduleSweep() {
        let interval = min(max(idleTimeout / 4, .milliseconds(50)), .seconds(5))
        sweep = loop.schedule(after: interval) { [weak self] in
            guard let self else { return }
            for s in Array(self.sessions.values) where self.loop.now &- s.lastActivity >= self.idleTimeout.nanoseconds {
                self.close(s, .idleTimeout)
            }
            self.scheduleSweep()
        }
    }

    // MARK: drop reports

    /// Writes the drops now when the last report is at least `reportInterval` old, else
    /// once it is: the first drop of a flood is seen at once, the rest in one line a second.
    private func report() {
        guard reportTimer == nil else { return }
        let interval = Self.reportInterval.nanoseconds
        let elapsed = lastReport.map { loop.now &- $0 } ?? interval
        if elapsed >= interval { return writeReport() }
        reportTimer = loop.schedule(after: .nanoseconds(Int64(interval - elapsed))) { [weak self] in
            guard let self else { return }
            self.reportTimer = nil
            self.writeReport()
        }
    }

    private func writeReport() {
        guard !drops.isEmpty else { return }
        lastReport = loop.now
        if drops.sessionLimit + drops.noDescriptor > 0 {
            logger.warning("UDP datagrams dropped", metadata: [
                "service": "\(service)", "session_limit": .stringConvertible(drops.sessionLimit),
                "no_descriptor": .stringConvertible(drops.noDescriptor), "max_sessions": .stringConvertible(maxSessions),
            ])
        }
        if drops.unreachable > 0 {
            var metadata: Logger.Metadata = [
                "service": "\(service)", "target": "\(target.map(\.description).joined(separator: ","))",
                "dropped": .stringConvertible(drops.unreachable),
            ]
            if let error = drops.unreachableError { metadata["error"] = "\(error)" }
            logger.warning("local UDP service unreachable", metadata: metadata)
        }
        drops = Drops()
    }

    /// Ends every session; the relay is finished.
    func closeAll() {
        guard !finished else { return }
        finished = true
        sweep?.cancel()
        sweep = nil
        reportTimer?.cancel()
        reportTimer = nil
        writeReport()
        for s in Array(sessions.values) { close(s, .shutdown) }
        if !channel.isClosed { channel.close() }
        onClose(self)
    }
}
