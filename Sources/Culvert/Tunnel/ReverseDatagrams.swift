#if canImport(Glibc)
import Glibc
#endif
import Logging
import Reactor
import Synchronization
import Transfer

// Relay streams: the UDP ASSOCIATE of a `-R proxy:` visitor. Its SOCKS client is on the
// server's side, so the relay socket it sends to is bound on the server, while the
// client, the exit, sends the datagrams from its own network. The client opens the
// stream on the carrier its visitor came by; the open payload is the kind byte
// `relayKind`, the visitor's address (str, as the server sent it), the request's
// DST.PORT (u16: the port the visitor sends from, 0 for any) and the proxy's bind host
// (str, empty for the server's default). The server answers with an `ExitStatus`
// whose reason, after `connected`, is the relay socket's address; then both sides send
// the frames of UDP exit streams: from the server the address is the destination the
// visitor named, from the client the source of a reply.

// MARK: the server: the relay socket

/// The server's side of relay streams: for each, a `UDPAssociation` bound where the
/// `-R proxy:` listens, taking datagrams from the visitor's address only, whose route
/// is the stream. No `--allow-exit` is needed: the client is the exit, the server only
/// relays, as it does for a UDP service. Relays count against a cap, as exposed
/// services do, and bind only where `--bind-addr` allows.
///
/// Thread confinement: shared by every loop; immutable but for the atomic count. Each
/// stream is served on the loop of its carrier.
final class ServerRelays: Sendable {
    private let config: TunnelServerConfig
    private let logger: Logger
    private let maxRelays: Int
    private let active = Atomic<Int>(0)

    init(config: TunnelServerConfig, logger: Logger, maxRelays: Int) {
        self.config = config
        self.logger = logger
        self.maxRelays = maxRelays
    }

    /// A relay stream the client of `peer` opened on a carrier of `home`.
    func opened(_ stream: MuxStream, _ request: TunnelProtocol.RelayRequest, peer: String, on home: ServerLoop) {
        guard active.wrappingAdd(1, ordering: .relaxed).newValue <= maxRelays else {
            active.wrappingSubtract(1, ordering: .relaxed)
            return refuse(stream, "UDP relays at their limit (\(maxRelays))", peer: peer, on: home.loop)
        }
        let local: SocketAddress
        let visitor: SocketAddress
        switch placement(of: request) {
        case .failure(let refusal):
            active.wrappingSubtract(1, ordering: .relaxed)
            return refuse(stream, refusal.reason, peer: peer, on: home.loop)
        case .success(let found):
            (local, visitor) = found
        }
        let relays = home.exitRelays
        let pending = ExitPendingBox()
        let task = Task(executorPreference: home.loop.tasks) { [self] in
            await serve(stream, local: local, visitor: visitor, port: request.port, peer: peer, home: home)
            active.wrappingSubtract(1, ordering: .relaxed)
            if let entry = pending.entry { relays.remove(pending: entry) }
        }
        pending.entry = relays.add { task.cancel() }
    }

    /// Where the relay socket binds and whom it takes datagrams from, or why not.
    private func placement(of request: TunnelProtocol.RelayRequest) -> Result<(SocketAddress, SocketAddress), RelayRefusal> {
        guard let visitor = SocketAddress(description: request.visitor) else {
            return .failure(RelayRefusal(reason: "no visitor address to take datagrams from ('\(request.visitor)')"))
        }
        let host = !request.bindHost.isEmpty ? request.bindHost
            : config.bindAddresses.first ?? (visitor.family == AF_INET6 ? "::" : "0.0.0.0")
        if !config.bindAddresses.isEmpty && !config.bindAddresses.contains(host) {
            return .failure(RelayRefusal(reason: "bind address \(host) is not allowed (allowed: \(config.bindAddresses.joined(separator: ",")))"))
        }
        guard var local = SocketAddress(numericHost: host, port: 0) else {
            return .failure(RelayRefusal(reason: "bind address '\(host)' is not a numeric IP address"))
        }
        if ProxyRule.addressBytes(local).allSatisfy({ $0 == 0 }) {
            switch Self.addressFacing(visitor) {
            case .success(let facing): local = facing
            case .failure(let error): return .failure(RelayRefusal(reason: "no local address towards \(visitor): \(error)"))
            }
        }
        // The relay port is the kernel's choice, like a SOCKS server's.
        guard config.allowPorts.coversEphemeralRange else {
            return .failure(RelayRefusal(reason: "the server's --allow-ports does not cover the ephemeral ports UDP relays use"))
        }
        return .success((local, visitor))
    }

    /// The address this host sends to `visitor` from. A relay bound on a wildcard would
    /// answer the SOCKS client with 0.0.0.0 or ::, leaving it to guess where to send;
    /// bound on this address instead, the reply names a concrete address the visitor can
    /// reach, and the relay's datagrams come from that same address. The visitor's TCP
    /// connection is on the server's side of the tunnel while the request comes from the
    /// client, so the route is asked (a connected UDP socket sends nothing).
    private static func addressFacing(_ visitor: SocketAddress) -> Result<SocketAddress, SystemError> {
        Result { () throws(SystemError) -> SocketAddress in
            let fd = try Net.udpConnect(visitor, bufferSize: 0)
            defer { Posix.close(fd) }
            return try Net.localAddress(fd).withPort(0)
        }
    }

    private func serve(_ stream: MuxStream, local: SocketAddress, visitor: SocketAddress, port: UInt16, peer: String,
                       home: ServerLoop) async {
        let loop = home.loop
        let channel: AsyncDuplex
        do {
            channel = try AsyncDuplex(loop: loop, duplex: stream, sendLimit: TunnelProtocol.datagramQueueLimit * 2)
        } catch {
            return stream.close(reset: true)
        }
        let link = StreamDatagramExit(channel: channel)
        let association: UDPAssociation
        do {
            association = try UDPAssociation(loop: loop, local: local, client: visitor, requested: port, exit: link,
                                             batch: home.datagramBatch) { _ in }
        } catch {
            logger.warning("cannot open UDP relay socket", metadata: ["peer": "\(peer)", "error": "\(error)"])
            return await StreamRefusal.end(channel, stream, .failed, "cannot open UDP relay socket: \(error)", on: loop)
        }
        channel.send(TunnelProtocol.encodeExitReply(.connected, reason: association.relayAddress.description))
        let reason = await link.deliverFrames(cancel: { loop.execute { channel.fail(.closed) } })
        association.close()
        channel.close()
        var metadata: Logger.Metadata = [
            "peer": "\(peer)", "visitor": "\(visitor)", "relay": "\(association.relayAddress)", "reason": "\(reason)",
            "datagrams_up": .stringConvertible(association.datagramsUp), "datagrams_down": .stringConvertible(association.datagramsDown),
        ]
        for (drop, count) in association.drops { metadata["dropped_\(drop.rawValue)"] = .stringConvertible(count) }
        if link.full > 0 { metadata["dropped_full_stream"] = .stringConvertible(link.full) }
        logger.info("reverse udp relay closed", metadata: metadata)
    }

    /// Answers a relay stream that gets no relay, and ends it.
    private func refuse(_ stream: MuxStream, _ reason: String, peer: String, on loop: EventLoop) {
        logger.warning("UDP relay refused", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
        StreamRefusal.answer(stream, .failed, reason, on: loop)
    }
}

/// Why a relay stream gets no relay, for its answer.
private struct RelayRefusal: Error {
    let reason: String
}

/// The route of the server's relay socket: what the visitor sends goes to the client
/// as frames on the stream, and frames from the client are the replies.
///
/// Thread confinement: every method runs on the stream's loop.
private final class StreamDatagramExit: DatagramExit, DatagramRoute, @unchecked Sendable {
    private let channel: AsyncDuplex
    private var reply: ((SocketAddress, UnsafeRawBufferPointer) -> Void)?
    private var drop: ((DatagramDrop) -> Void)?
    /// Datagrams dropped because the stream had too much queued.
    private(set) var full = 0

    init(channel: AsyncDuplex) {
        self.channel = channel
    }

    func openRoute(on loop: EventLoop, reply: @escaping (SocketAddress, UnsafeRawBufferPointer) -> Void,
                   drop: @escaping (DatagramDrop) -> Void) -> DatagramRoute {
        self.reply = reply
        self.drop = drop
        return self
    }

    func send(_ payload: UnsafeRawBufferPointer, to destination: ProxyDestination) {
        guard reply != nil else { return }
        guard channel.queuedOutput < TunnelProtocol.datagramQueueLimit else {
            full += 1
            return
        }
        channel.send(TunnelProtocol.datagramFrame(header: Socks5.datagramHeader(destination: destination), payload))
    }

    func close() {
        reply = nil
        drop = nil
    }

    /// Hands the client's frames to the relay socket until the stream ends; returns why.
    /// Reading ends only by an error: the frame loop has no other way out.
    func deliverFrames(cancel: @escaping @Sendable () -> Void) async -> String {
        do {
            try await withTaskCancellationHandler {
                while true {
                    let frame = try await TunnelProtocol.readDatagramFrame(from: channel)
                    frame.withUnsafeBytes { raw in
                        guard let header = Socks5.parseDatagramHeader(raw), header.fragment == 0,
                              case .address(let source) = header.destination else {
                            drop?(.malformed)
                            return
                        }
                        reply?(source, UnsafeRawBufferPointer(rebasing: raw[header.length...]))
                    }
                }
            } onCancel: {
                cancel()
            }
            return "shutdown"
        } catch ChannelError.eof {
            return "client closed"
        } catch ChannelError.closed {
            return "shutdown"
        } catch {
            return "\(error)"
        }
    }
}

/// The relay-set entry of a relay stream, set right after the task that removes it is
/// made (the task runs later on the same loop).
private final class ExitPendingBox: @unchecked Sendable {
    var entry: RelaySet.Pending?
}

// MARK: the client: the exit

/// Opens the relays of one `-R proxy:` visitor on the carrier it came by (the server it
/// reached is the one whose relay socket it can send to), and sends what comes through
/// them from this host, under the client's `--exit-allow`/`--exit-deny`.
///
/// Thread confinement: used on the carrier's loop.
final class ReverseRelayOpener: RemoteRelayOpener {
    private weak var carrier: MuxConnection?
    private let visitor: String
    private let bindHost: String
    private let exit: DatagramExit
    private let logger: Logger

    init(carrier: MuxConnection, visitor: String, bindHost: String?, exit: DatagramExit, logger: Logger) {
        self.carrier = carrier
        self.visitor = visitor
        self.bindHost = bindHost ?? ""
        self.exit = exit
        self.logger = logger
    }

    func open(requested port: UInt16, on loop: EventLoop, ended: @escaping (String) -> Void) async -> Result<DatagramRelay, ProxyFailure> {
        let request = TunnelProtocol.RelayRequest(visitor: visitor, port: port, bindHost: bindHost)
        guard let carrier, !carrier.isClosed, let stream = carrier.open(TunnelProtocol.encodeRelayOpen(request)) else {
            return .failure(.general("the tunnel is not connected"))
        }
        let channel: AsyncDuplex
        do {
            channel = try AsyncDuplex(loop: loop, duplex: stream, sendLimit: TunnelProtocol.datagramQueueLimit * 2)
        } catch {
            stream.close(reset: true)
            return .failure(.general("\(error)"))
        }
        let status: TunnelProtocol.ExitStatus
        let reason: String
        do {
            (status, reason) = try await withTaskCancellationHandler {
                try await TunnelProtocol.readExitReply(from: channel)
            } onCancel: {
                loop.execute { channel.fail(.closed) }
            }
        } catch {
            channel.fail(.closed)
            return .failure(.general("relay stream lost: \(error) (a server older than relay streams resets them: upgrade it for UDP ASSOCIATE through -R proxy:)"))
        }
        guard status == .connected else {
            channel.close()
            return .failure(ExitStatusMapping.failure(of: status, reason: "the server refused a UDP relay: \(reason)") ?? .general(reason))
        }
        guard let relayAddress = SocketAddress(description: reason) else {
            channel.close()
            return .failure(.general("the server named no relay address ('\(reason)')"))
        }
        return .success(ReverseRelay(loop: loop, channel: channel, relayAddress: relayAddress, exit: exit, logger: logger, ended: ended))
    }
}

/// One `-R proxy:` association at the client: frames from the server go out from this
/// host through the exit's route, and what comes back goes to the server as frames.
///
/// Thread confinement: every method runs on `loop`.
private final class ReverseRelay: DatagramRelay {
    let relayAddress: SocketAddress
    private(set) var lastActivity: UInt64
    private(set) var datagramsUp: UInt64 = 0
    private(set) var bytesUp: UInt64 = 0
    private(set) var datagramsDown: UInt64 = 0
    private(set) var bytesDown: UInt64 = 0
    private(set) var drops: [DatagramDrop: Int] = [:]
    private let loop: EventLoop
    private let channel: AsyncDuplex
    private var route: DatagramRoute?

    init(loop: EventLoop, channel: AsyncDuplex, relayAddress: SocketAddress, exit: DatagramExit, logger: Logger,
         ended: @escaping (String) -> Void) {
        self.loop = loop
        self.channel = channel
        self.relayAddress = relayAddress
        lastActivity = loop.now
        route = exit.openRoute(on: loop, reply: { [unowned self] source, payload in
            guard channel.queuedOutput < TunnelProtocol.datagramQueueLimit else { return count(.full) }
            datagramsDown += 1
            bytesDown += UInt64(payload.count)
            lastActivity = loop.now
            channel.send(TunnelProtocol.datagramFrame(header: Socks5.datagramHeader(source: source), payload))
        }, drop: { [unowned self] reason in count(reason) })
        Task(executorPreference: loop.tasks) { [weak self] in
            do {
                while true {
                    let frame = try await TunnelProtocol.readDatagramFrame(from: channel)
                    guard let self, self.route != nil else { return }
                    self.forward(frame)
                }
            } catch ChannelError.closed {
                // The association ended here first.
            } catch {
                guard let self, self.route != nil else { return }
                ended("\(error)")
            }
        }
    }

    private func forward(_ frame: [UInt8]) {
        frame.withUnsafeBytes { raw in
            guard let header = Socks5.parseDatagramHeader(raw), header.fragment == 0 else { return count(.malformed) }
            let payload = UnsafeRawBufferPointer(rebasing: raw[header.length...])
            datagramsUp += 1
            bytesUp += UInt64(payload.count)
            lastActivity = loop.now
            route?.send(payload, to: header.destination)
        }
    }

    private func count(_ reason: DatagramDrop) {
        drops[reason, default: 0] += 1
    }

    func close() {
        loop.assertInLoop()
        guard let route else { return }
        self.route = nil
        route.close()
        channel.close()
    }
}
