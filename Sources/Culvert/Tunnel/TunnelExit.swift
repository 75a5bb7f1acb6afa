#if canImport(Glibc)
import Glibc
#endif
import Logging
import Reactor
import Synchronization
import Transfer

/// The server's end of `culvert client -D`: each exit stream a client opens on one of
/// its carriers names a destination; the server, when it is an exit (`--allow-exit`),
/// resolves and dials it under its exit policy, answers the stream with an
/// `ExitStatus`, and relays. Without `--allow-exit` every exit stream is answered
/// `exitsDisabled` (a client is told at `useExit` and opens none).
///
/// Thread confinement: shared by every loop; its state is immutable but for the atomic
/// count. Each stream is served on the loop of its carrier.
final class ServerExit: Sendable {
    let enabled: Bool
    private let exit: LocalExit
    private let datagrams: LocalDatagramExit
    /// The relay sockets of `-R proxy:` UDP associations, which need no `--allow-exit`.
    private let reverseRelays: ServerRelays
    private let logger: Logger
    private let refusals: RefusalSummary
    private let maxStreams: Int
    private let active = Atomic<Int>(0)

    /// Destinations one UDP exit stream talks to at once, a socket each (the least
    /// recently used makes room for a new one), as `culvert proxy` does by default.
    static let socketsPerAssociation = 16

    /// - Parameter loopCount: the loops of the group, for the datagram batches.
    init(config: TunnelServerConfig, logger: Logger, loop: EventLoop, loopCount: Int) {
        enabled = config.allowExit
        let guarded = config.allowExit ? Self.guardedNetworks() : []
        let policy = ProxyPolicy(allow: config.exitAllow, deny: config.exitDeny, guarded: guarded)
        let resolver = CachingResolver()
        exit = LocalExit(policy: policy, resolver: resolver, connectTimeout: config.exitConnectTimeout)
        datagrams = LocalDatagramExit(policy: policy, resolver: resolver, maxSockets: Self.socketsPerAssociation,
                                      batches: DatagramBatches(loops: loopCount))
        self.logger = logger
        refusals = RefusalSummary(logger: logger, message: "exit requests refused", loop: loop)
        // An exit stream holds one socket, and two pipe ends while it splices.
        maxStreams = max(1, UDPSessionBudget.freeDescriptors() / 4)
        reverseRelays = ServerRelays(config: config, logger: logger, maxRelays: max(1, UDPSessionBudget.freeDescriptors() / 8))
    }

    /// Networks an exit does not reach unless an `--exit-allow` network names them: the
    /// loopback, link-local and unspecified networks and every address of this host, so
    /// that `-D` does not turn the server's own local services into public ones.
    static func guardedNetworks() -> [ProxyRule] {
        var texts = ["127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "[::1/128]", "[::/128]", "[fe80::/10]"]
        texts += HostAddresses.all().map { $0.description.hasPrefix("[") ? "[\($0.host)]" : $0.host }
        return texts.compactMap { try? ProxyRule.parse($0) }
    }

    /// An exit stream opened by the client of `peer` on a carrier of `home`.
    func streamOpened(_ stream: MuxStream, _ payload: UnsafeRawBufferPointer, peer: String, on home: ServerLoop) {
        if TunnelProtocol.isDatagramsOpen(payload) { return datagramsOpened(stream, peer: peer, on: home) }
        let destination: ProxyDestination
        do {
            if let relay = try TunnelProtocol.decodeRelayOpen(payload) { return reverseRelays.opened(stream, relay, peer: peer, on: home) }
            destination = try TunnelProtocol.decodeExitOpen(payload)
        } catch {
            refused("bad_request", peer, "malformed exit stream: \(error)")
            return stream.close(reset: true)
        }
        guard active.wrappingAdd(1, ordering: .relaxed).newValue <= maxStreams else {
            active.wrappingSubtract(1, ordering: .relaxed)
            refused("limit", peer, "exit streams at their limit (\(maxStreams))")
            return StreamRefusal.answer(stream, .failed, "exit at its connection limit", on: home.loop)
        }
        let relays = home.exitRelays
        let outcome = ExitPending()
        let task = Task(executorPreference: home.loop.tasks) { [self] in
            await serve(stream, to: destination, peer: peer, relays: relays)
            if let pending = outcome.pending { relays.remove(pending: pending) }
        }
        outcome.pending = relays.add { task.cancel() }
    }

    private func serve(_ stream: MuxStream, to destination: ProxyDestination, peer: String, relays: RelaySet) async {
        let loop = relays.loop
        guard enabled else {
            active.wrappingSubtract(1, ordering: .relaxed)
            refused("exits_disabled", peer, "exit stream refused: the server runs without --allow-exit", destination)
            return StreamRefusal.answer(stream, .exitsDisabled, "this server is no exit (--allow-exit)", on: loop)
        }
        switch await exit.connect(to: destination, on: loop) {
        case .failure(let failure):
            active.wrappingSubtract(1, ordering: .relaxed)
            refused(failure.label, peer, "exit request refused: \(failure)", destination)
            StreamRefusal.answer(stream, ExitStatusMapping.status(of: failure), failure.description, on: loop)
        case .success(let upstream):
            let channel: AsyncDuplex
            do {
                channel = try AsyncDuplex(loop: loop, duplex: stream)
                channel.send(TunnelProtocol.encodeExitReply(.connected))
                try await channel.flush()
            } catch {
                active.wrappingSubtract(1, ordering: .relaxed)
                upstream.stream.close(reset: true)
                stream.close(reset: true)
                return
            }
            let logger = logger
            let started = relays.start(a: channel.detach(), b: upstream.stream, peer: peer) { [self] relay, reason in
                active.wrappingSubtract(1, ordering: .relaxed)
                logger.connectionClosed(peer: peer, "exit", "\(destination)", relay: relay, reason: reason)
            }
            if started == nil { active.wrappingSubtract(1, ordering: .relaxed) }
        }
    }

    /// A UDP exit stream (a `-D` client's UDP ASSOCIATE): counted as an exit stream,
    /// served until either side ends it. Its sockets weigh on the descriptors too, so it
    /// counts `1 + socketsPerAssociation` against the limit.
    private func datagramsOpened(_ stream: MuxStream, peer: String, on home: ServerLoop) {
        let weight = 1 + Self.socketsPerAssociation
        guard active.wrappingAdd(weight, ordering: .relaxed).newValue <= maxStreams else {
            active.wrappingSubtract(weight, ordering: .relaxed)
            refused("limit", peer, "exit streams at their limit (\(maxStreams))")
            return StreamRefusal.answer(stream, .failed, "exit at its connection limit", on: home.loop)
        }
        let relays = home.exitRelays
        let outcome = ExitPending()
        let task = Task(executorPreference: home.loop.tasks) { [self] in
            await serveDatagrams(stream, peer: peer, loop: relays.loop)
            active.wrappingSubtract(weight, ordering: .relaxed)
            if let pending = outcome.pending { relays.remove(pending: pending) }
        }
        outcome.pending = relays.add { task.cancel() }
    }

    private func serveDatagrams(_ stream: MuxStream, peer: String, loop: EventLoop) async {
        guard enabled else {
            refused("exits_disabled", peer, "UDP exit stream refused: the server runs without --allow-exit")
            return StreamRefusal.answer(stream, .exitsDisabled, "this server is no exit (--allow-exit)", on: loop)
        }
        let channel: AsyncDuplex
        do {
            channel = try AsyncDuplex(loop: loop, duplex: stream, sendLimit: TunnelProtocol.datagramQueueLimit * 2)
        } catch {
            return stream.close(reset: true)
        }
        channel.send(TunnelProtocol.encodeExitReply(.connected))
        var counts = (up: 0, down: 0, full: 0)
        var drops: [DatagramDrop: Int] = [:]
        let route = datagrams.openRoute(on: loop, reply: { source, payload in
            guard channel.queuedOutput < TunnelProtocol.datagramQueueLimit else { return counts.full += 1 }
            counts.down += 1
            channel.send(TunnelProtocol.datagramFrame(header: Socks5.datagramHeader(source: source), payload))
        }, drop: { [self] reason in
            drops[reason, default: 0] += 1
            if reason == .denied { refused("denied", peer, "exit datagram dropped: destination not allowed by policy") }
        })
        // Reading ends only by an error: the frame loop has no other way out.
        var reason = "shutdown"
        do {
            try await withTaskCancellationHandler {
                while true {
                    let frame = try await TunnelProtocol.readDatagramFrame(from: channel)
                    frame.withUnsafeBytes { raw in
                        guard let header = Socks5.parseDatagramHeader(raw), header.fragment == 0 else {
                            drops[.malformed, default: 0] += 1
                            return
                        }
                        counts.up += 1
                        route.send(UnsafeRawBufferPointer(rebasing: raw[header.length...]), to: header.destination)
                    }
                }
            } onCancel: {
                loop.execute { channel.fail(.closed) }
            }
        } catch ChannelError.eof {
            reason = "client closed"
        } catch ChannelError.closed {
            reason = "shutdown"
        } catch {
            reason = "\(error)"
        }
        route.close()
        channel.close()
        var metadata: Logger.Metadata = [
            "peer": "\(peer)", "reason": "\(reason)",
            "datagrams_up": .stringConvertible(counts.up), "datagrams_down": .stringConvertible(counts.down),
        ]
        if counts.full > 0 { drops[.full, default: 0] += counts.full }
        for (drop, count) in drops { metadata["dropped_\(drop.rawValue)"] = .stringConvertible(count) }
        logger.info("exit udp association closed", metadata: metadata)
    }

    private func refused(_ reason: String, _ peer: String, _ message: String, _ destination: ProxyDestination? = nil) {
        guard refusals.record(reason) else { return }
        var metadata: Logger.Metadata = ["peer": "\(peer)", "reason": "\(reason)"]
        if let destination { metadata["destination"] = "\(destination)" }
        logger.warning("\(message)", metadata: metadata)
    }
}

/// How exit failures travel: the exit sends an `ExitStatus`, the client's proxy turns it
/// back into the `ProxyFailure` its front ends answer with.
enum ExitStatusMapping {
    static func status(of failure: ProxyFailure) -> TunnelProtocol.ExitStatus {
        switch failure {
        case .notAllowed: return .notAllowed
        case .networkUnreachable: return .networkUnreachable
        case .hostUnreachable: return .hostUnreachable
        case .nameNotFound: return .nameNotFound
        case .connectionRefused: return .connectionRefused
        case .timedOut: return .timedOut
        case .general: return .failed
        }
    }

    /// nil for `connected`.
    static func failure(of status: TunnelProtocol.ExitStatus, reason: String) -> ProxyFailure? {
        switch status {
        case .connected: return nil
        case .notAllowed, .exitsDisabled: return .notAllowed
        case .networkUnreachable: return .networkUnreachable
        case .hostUnreachable: return .hostUnreachable
        case .nameNotFound: return .nameNotFound(reason)
        case .connectionRefused: return .connectionRefused
        case .timedOut: return .timedOut
        case .failed: return .general(reason)
        }
    }
}

/// The addresses of this host's interfaces (getifaddrs), for the exit's default denial.
enum HostAddresses {
    static func all() -> [SocketAddress] {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0 else { return [] }
        defer { freeifaddrs(list) }
        var out: [SocketAddress] = []
        var next = list
        while let entry = next {
            if let addr = entry.pointee.ifa_addr, let address = SocketAddress(storage: addr) { out.append(address) }
            next = entry.pointee.ifa_next
        }
        return out
    }
}

/// The relay-set entry of an exit stream being dialed, set right after the task that
/// removes it is made (the task runs later on the same loop).
private final class ExitPending: @unchecked Sendable {
    var pending: RelaySet.Pending?
}
