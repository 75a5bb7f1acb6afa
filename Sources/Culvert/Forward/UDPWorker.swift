#if canImport(Glibc)
import Glibc
#endif
import Logging
import Reactor
import Transfer

/// The part of a UDP forwarder on one loop: its listening sockets (SO_REUSEPORT keeps a
/// client's datagrams on the same socket, hence the same loop), its sessions, and one
/// datagram batch reused for every recvmmsg/sendmmsg.
///
/// Thread confinement: every method runs on `loop`; Sendable only so that a scrape can
/// reach it there (`onEachLoop`).
final class UDPWorker: @unchecked Sendable {
    /// A listening socket and its registration.
    private final class Listener: EventHandler {
        let fd: Int32
        let address: SocketAddress
        var registration: Registration?
        unowned let worker: UDPWorker
        init(fd: Int32, address: SocketAddress, worker: UDPWorker) {
            self.fd = fd
            self.address = address
            self.worker = worker
        }
        func handleEvents(_ events: UInt32, tag: UInt8) { worker.relayRequests(from: self) }
    }

    let loop: EventLoop
    private unowned let forwarder: UDPForwarder
    private let batch = DatagramBatch()
    private var listeners: [Listener] = []
    private var sessions: [SocketAddress: UDPSession] = [:]
    private var sweepTimer: LoopTimer?
    /// Batches one socket may take per wake-up before yielding to the others.
    private static let batchesPerWakeup = 8
    private var dropped = (limit: 0, noDescriptor: 0, full: 0, oversized: 0)
    private var lastDropLog: UInt64 = 0
    let meters: LoopMeters
    private let meter: ServiceMeter

    init(loop: EventLoop, forwarder: UDPForwarder) {
        self.loop = loop
        self.forwarder = forwarder
        meters = LoopMeters(loop: loop)
        meter = meters.service(forwarder.serviceName, kind: "udp")
    }

    /// This loop's metrics: ended sessions, live sessions' counters, drops not yet logged.
    func sample() -> MetricsSnapshot {
        loop.assertInLoop()
        var snapshot = meters.sample()
        var live = ServiceSample(kind: "udp")
        for s in sessions.values {
            live.bytesUp += s.bytesUp
            live.bytesDown += s.bytesDown
            live.datagramsUp += s.datagramsUp
            live.datagramsDown += s.datagramsDown
        }
        live.dropped = droppedByReason.filter { $0.value > 0 }
        snapshot.services[forwarder.serviceName]?.add(live)
        return snapshot
    }

    /// Drops counted since the last summary line, by metric reason.
    private var droppedByReason: [String: UInt64] {
        ["session_limit": UInt64(dropped.limit), "no_descriptor": UInt64(dropped.noDescriptor),
         "socket_full": UInt64(dropped.full), "oversized": UInt64(dropped.oversized)]
    }

    func start(listeners fds: [(fd: Int32, address: SocketAddress)]) {
        loop.assertInLoop()
        for l in fds {
            let listener = Listener(fd: l.fd, address: l.address, worker: self)
            do {
                listener.registration = try loop.register(fd: l.fd, interest: .read, handler: listener)
                listeners.append(listener)
            } catch {
                forwarder.logger.error("cannot watch listener", metadata: ["listen": "\(l.address)", "error": "\(error)"])
                Posix.close(l.fd)
            }
        }
        scheduleSweep()
        for l in listeners { relayRequests(from: l) }
    }

    /// Closes listeners and every session.
    func stop() {
        loop.assertInLoop()
        sweepTimer?.cancel()
        sweepTimer = nil
        for l in listeners {
            if let r = l.registration { loop.deregister(fd: l.fd, registration: r) }
            Posix.close(l.fd)
        }
        listeners.removeAll()
        for s in Array(sessions.values) { close(s, .shutdown) }
        logDrops(force: true)
    }

    // MARK: client -> target

    private func relayRequests(from listener: Listener) {
        for _ in 0..<Self.batchesPerWakeup {
            let n: Int
            do {
                n = try batch.receive(from: listener.fd)
            } catch {
                forwarder.logger.warning("receive failed", metadata: ["listen": "\(listener.address)", "error": "\(error)"])
                return
            }
            if n == 0 { return }
            forwardBatch(count: n, listener: listener)
            if n < batch.capacity { return }
        }
        // More may be waiting: continue after other sockets had their turn.
        loop.deferTask { [weak self, weak listener] in
            guard let self, let listener, listener.registration != nil else { return }
            self.relayRequests(from: listener)
        }
    }

    /// Sends each datagram of the batch to its client's session, in runs of consecutive
    /// datagrams of the same session so each run is one sendmmsg.
    private func forwardBatch(count: Int, listener: Listener) {
        var i = 0
        while i < count {
            guard let client = batch.address(i) else { i += 1; continue }
            if batch.isTruncated(i) {
                dropped.oversized += 1
                i += 1
                continue
            }
            guard let session = sessions[client] ?? openSession(for: client, listener: listener) else {
                i += 1
                continue
            }
            var end = i + 1
            while end < count, !batch.isTruncated(end), batch.address(end) == client { end += 1 }
            var bytes = 0
            for k in i..<end {
                bytes += batch.length(k)
                batch.setAddress(k, nil)
            }
            do {
                let sent = try batch.send(to: session.fd, i..<end)
                session.datagramsUp += UInt64(sent)
                session.bytesUp += UInt64(sent == end - i ? bytes : (i..<(i + sent)).reduce(0) { $0 + batch.length($1) })
                dropped.full += (end - i) - sent
                session.lastActivity = loop.now
            } catch {
                if error.errno == EMSGSIZE {
                    dropped.oversized += end - i
                } else {
                    targetFailed(session, error)
                }
            }
            i = end
        }
        logDrops(force: false)
    }

    private func openSession(for client: SocketAddress, listener: Listener) -> UDPSession? {
        guard forwarder.admitSession() else {
            dropped.limit += 1
            return nil
        }
        for attempt in forwarder.targets.attempts(now: loop.now) {
            do throws(SystemError) {
                let fd = try Net.udpConnect(attempt.address, bufferSize: forwarder.config.socketBuffer)
                let session = UDPSession(client: client, attempt: attempt, fd: fd, listenerFD: listener.fd, now: loop.now, worker: self)
                do {
                    session.registration = try loop.register(fd: fd, interest: .read, handler: session)
                } catch {
                    Posix.close(fd)
                    throw error
                }
                sessions[client] = session
                meter.sessionOpened()
                forwarder.logger.debug("session opened", metadata: ["peer": "\(client)", "target": "\(attempt.address)"])
                return session
            } catch {
                // Out of descriptors or socket memory: another target would fail the same
                // way, and in a flood a line per datagram would bury everything else.
                if UDPSessionBudget.isOutOfResources(error.errno) {
                    dropped.noDescriptor += 1
                    break
                }
                forwarder.logger.warning("cannot open session socket", metadata: ["target": "\(attempt.address)", "error": "\(error)"])
            }
        }
        forwarder.releaseSession()
        return nil
    }

    // MARK: target -> client

    func relayReplies(of session: UDPSession) {
        for _ in 0..<Self.batchesPerWakeup {
            guard session.registration != nil else { return }
            let n: Int
            do {
                n = try batch.receive(from: session.fd)
            } catch {
                return targetFailed(session, error)
            }
            if n == 0 { return }
            var bytes = 0
            for k in 0..<n {
                bytes += batch.length(k)
                batch.setAddress(k, session.client)
            }
            do {
                let sent = try batch.send(to: session.listenerFD, 0..<n)
                session.datagramsDown += UInt64(sent)
                session.bytesDown += UInt64(sent == n ? bytes : (0..<sent).reduce(0) { $0 + batch.length($1) })
                dropped.full += n - sent
                session.lastActivity = loop.now
            } catch {
                forwarder.logger.warning("reply to client failed", metadata: ["peer": "\(session.client)", "error": "\(error)"])
            }
            if n < batch.capacity { return }
        }
        loop.deferTask { [weak self, weak session] in
            guard let self, let session else { return }
            self.relayReplies(of: session)
        }
    }

    // MARK: session ends

    private func targetFailed(_ session: UDPSession, _ error: SystemError) {
        forwarder.targets.markDown(session.attempt.target, now: loop.now)
        forwarder.logger.warning("target unreachable", metadata: ["target": "\(session.attempt.address)", "peer": "\(session.client)", "error": "\(error)"])
        close(session, .targetError, error: error)
    }

    private func close(_ session: UDPSession, _ end: UDPSessionEnd, error: SystemError? = nil) {
        guard let reg = session.registration else { return }
        loop.deregister(fd: session.fd, registration: reg)
        session.registration = nil
        Posix.close(session.fd)
        sessions[session.client] = nil
        forwarder.releaseSession()
        meter.sessionClosed(result: end.rawValue, bytesUp: session.bytesUp, bytesDown: session.bytesDown,
                            datagramsUp: session.datagramsUp, datagramsDown: session.datagramsDown)
        var metadata: Logger.Metadata = [
            "peer": "\(session.client)", "target": "\(session.attempt.address)",
            "up": .stringConvertible(session.bytesUp), "down": .stringConvertible(session.bytesDown),
            "datagrams_up": .stringConvertible(session.datagramsUp), "datagrams_down": .stringConvertible(session.datagramsDown),
            "duration": .stringConvertible(LoggedSeconds(nanoseconds: loop.now &- session.startedAt)),
            "reason": "\(end.rawValue)",
        ]
        if let error { metadata["error"] = "\(error)" }
        forwarder.logger.info("session closed", metadata: metadata)
    }

    /// Idle sessions are found by a periodic sweep rather than a timer per session:
    /// datagrams only stamp `lastActivity`, which costs nothing per packet.
    private func scheduleSweep() {
        let idle = forwarder.config.idleTimeout
        let interval = min(max(idle / 4, .milliseconds(50)), .seconds(5))
        sweepTimer = loop.schedule(after: interval) { [unowned self] in
            let limit = idle.nanoseconds
            for s in Array(sessions.values) where loop.now &- s.lastActivity >= limit {
                close(s, .idleTimeout)
            }
            scheduleSweep()
        }
    }

    private func logDrops(force: Bool) {
        let total = dropped.limit + dropped.noDescriptor + dropped.full + dropped.oversized
        guard total > 0, force || loop.now &- lastDropLog >= 1_000_000_000 else { return }
        lastDropLog = loop.now
        forwarder.logger.warning("datagrams dropped", metadata: [
            "session_limit": .stringConvertible(dropped.limit), "no_descriptor": .stringConvertible(dropped.noDescriptor),
            "socket_full": .stringConvertible(dropped.full), "oversized": .stringConvertible(dropped.oversized),
            "max_sessions": .stringConvertible(forwarder.maxSessions),
        ])
        for (reason, count) in droppedByReason { meter.countDropped(Int(count), reason: reason) }
        dropped = (0, 0, 0, 0)
    }
}
