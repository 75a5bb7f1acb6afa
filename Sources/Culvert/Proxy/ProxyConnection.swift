import Logging
import Reactor
import Transfer

/// One client of `culvert proxy` from accept until a relay takes it over (or it is
/// answered and closed): picks SOCKS5 or HTTP by the first byte, runs that handshake
/// under a deadline, asks the exit for the destination, and starts the relay in the
/// loop's `RelaySet`.
///
/// Thread confinement: created on `relays.loop`, run by a task on it.
final class ProxyConnection {
    let context: ProxyContext
    let relays: RelaySet
    let client: ProxyChannel
    let peer: String
    /// The client's address (the only one a UDP association takes datagrams from).
    let peerAddress: SocketAddress?
    /// Where a UDP association's relay goes when it cannot be on this host (a reverse
    /// proxy's client is on the far side of the tunnel server).
    let remoteRelays: RemoteRelayOpener?
    /// Where the connection says it may be ended at once by a drain.
    let idleClients: IdleClients
    /// The origin connection an HTTP client's forwarded requests are using, kept for the
    /// next request to the same destination.
    var origin: (destination: ProxyDestination, channel: ProxyChannel)?
    private var deadline: LoopTimer?

    var loop: EventLoop { relays.loop }
    var config: ProxyConfig { context.config }

    /// - Parameters:
    ///   - stream: the client's connection (a socket, or a tunnel stream whose visitor is
    ///     the client).
    ///   - peerAddress: the client's socket address; nil for a tunnel stream, whose UDP
    ///     associations then need `remoteRelays` (without, the command is refused).
    init(client stream: Duplex, peer: String, peerAddress: SocketAddress?, remoteRelays: RemoteRelayOpener? = nil,
         context: ProxyContext, relays: RelaySet, idleClients: IdleClients) throws(SystemError) {
        self.context = context
        self.relays = relays
        self.peer = peer
        self.peerAddress = peerAddress
        self.remoteRelays = remoteRelays
        self.idleClients = idleClients
        client = try ProxyChannel(loop: relays.loop, stream: stream)
    }

    /// Serves one client from its handshake on, in `relays` (pending until its relay
    /// starts); a client beyond the context's limit is closed at once.
    static func serve(_ stream: Duplex, peer: String, peerAddress: SocketAddress?, remoteRelays: RemoteRelayOpener? = nil,
                      context: ProxyContext, relays: RelaySet, idleClients: IdleClients) {
        guard context.admit() else {
            stream.close(reset: true)
            context.refused("limit", "connection refused: limit reached", peer, ["max": .stringConvertible(context.maxConnections)])
            return
        }
        let connection: ProxyConnection
        do {
            connection = try ProxyConnection(client: stream, peer: peer, peerAddress: peerAddress, remoteRelays: remoteRelays,
                                             context: context, relays: relays, idleClients: idleClients)
        } catch {
            stream.close(reset: true)
            context.release()
            context.logger.warning("cannot set up connection", metadata: ["peer": "\(peer)", "error": "\(error)"])
            return
        }
        let outcome = PendingOutcome()
        let task = Task(executorPreference: relays.loop.tasks) {
            if await !connection.run() { context.release() }
            if let pending = outcome.pending { relays.remove(pending: pending) }
        }
        outcome.pending = relays.add {
            connection.abort()
            task.cancel()
        }
    }

    /// Runs the handshake; true when a relay now owns the connection (its end releases
    /// the connection's place), false when the connection is closed and its place free.
    func run() async -> Bool {
        arm(config.handshakeTimeout, "handshake")
        defer { disarm() }
        do {
            try await client.fill()
            switch client.pending[0] {
            case Socks5.version:
                return try await runSocks5()
            case 4:
                context.refused("unsupported_version", "proxy handshake failed", peer, ["error": "SOCKS4 is not supported, only SOCKS5"])
                await answerAndClose(Socks5.socks4Rejected)
                return false
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"):
                return try await runHTTP()
            default:
                context.refused("unknown_protocol", "proxy handshake failed", peer,
                                ["error": "first byte \(client.pending[0]) is neither SOCKS5 (5) nor an HTTP method"])
                client.channel.fail(.protocolViolation("unknown protocol"))
                return false
            }
        } catch {
            let channelError = error as? ChannelError
            client.channel.fail(channelError ?? .protocolViolation("\(error)"))
            switch channelError {
            case .eof?, .closed?:
                context.logger.debug("proxy client left during its handshake", metadata: ["peer": "\(peer)"])
            case .timedOut?:
                context.refused("timed_out", "proxy handshake failed", peer, ["error": "\(error)"])
            default:
                context.refused("handshake_failed", "proxy handshake failed", peer, ["error": "\(error)"])
            }
            return false
        }
    }

    /// Ends the handshake or forwarding now (a drain deadline): whatever the task awaits
    /// on either connection throws.
    func abort() {
        client.channel.fail(.closed)
        origin?.channel.channel.fail(.closed)
    }

    /// (Re)starts the deadline: when it passes, the client connection (and `also`) fail
    /// with `what` timed out, and whatever awaits them throws.
    func arm(_ timeout: Duration, _ what: String, also other: ProxyChannel? = nil) {
        deadline?.cancel()
        deadline = loop.schedule(after: timeout) { [client] in
            client.channel.fail(.timedOut(what))
            other?.channel.fail(.timedOut(what))
        }
    }

    func disarm() {
        deadline?.cancel()
        deadline = nil
    }

    /// Sends a final answer (a refusal) and closes once it is out. Bytes the client
    /// sent that culvert did not read (the rest of an oversized head) are read and
    /// dropped for a moment first: closing with them unread would reset the connection
    /// and could destroy the answer before the client reads it.
    func answerAndClose(_ bytes: [UInt8]) async {
        arm(.seconds(2), "closing")
        defer { disarm() }
        client.channel.send(bytes)
        do {
            try await client.channel.flush()
            _ = client.channel.duplex.shutdownWrite()
            var dropped = 0
            while dropped < 1 << 20 { dropped += try await client.channel.read(max: 64 * 1024).count }
        } catch {}
        client.channel.close()
    }

    /// Asks the exit for `destination`; a failure is logged and returned for the
    /// front end to answer.
    func open(_ destination: ProxyDestination) async -> Result<ProxyExitStream, ProxyFailure> {
        let result = await context.exit.connect(to: destination, on: loop)
        if case .failure(let failure) = result {
            context.refused(failure.label, "proxy request refused", peer,
                            ["destination": "\(destination)", "error": "\(failure)"])
        }
        return result
    }

    /// Relays the client and `upstream`; bytes the client sent after its request go to
    /// the destination first. True when the relay started.
    func relay(to upstream: ProxyExitStream, destination: ProxyDestination) async -> Bool {
        disarm()
        let (stream, early) = client.detach()
        var target = upstream.stream
        if !early.isEmpty {
            do {
                let channel = try ProxyChannel(loop: loop, stream: target)
                try await channel.write(early)
                target = channel.detach().stream
            } catch {
                stream.close(reset: true)
                target.close(reset: true)
                context.logger.warning("proxy connection failed before its relay", metadata: ["peer": "\(peer)", "error": "\(error)"])
                return false
            }
        }
        let context = context
        let peer = peer
        let started = relays.start(a: stream, b: target, preferSplice: config.splice, idleTimeout: config.idleTimeout, peer: peer) { relay, reason in
            context.release()
            context.logger.connectionClosed(peer: peer, "destination", "\(destination)", relay: relay, reason: reason)
        }
        return started != nil
    }
}

/// The relay-set entry of a connection in its handshake, set right after the task that
/// removes it is made (the task runs later on the same loop).
private final class PendingOutcome: @unchecked Sendable {
    var pending: RelaySet.Pending?
}
