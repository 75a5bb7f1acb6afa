import Logging
import Reactor
import Transfer

/// SOCKS5 UDP ASSOCIATE: the connection's TCP stream stays open as the association's
/// lifeline while a `DatagramRelay` relays its datagrams; whatever ends the stream (the
/// client, the idle timeout, a drain) ends the association.
extension ProxyConnection {
    func runAssociation(_ request: Socks5.Request) async -> Bool {
        guard let udp = context.udp else {
            context.refused("unsupported_command", "proxy request refused", peer,
                            ["error": "UDP ASSOCIATE is not supported by this exit", "destination": "\(request.destination)"])
            await answerAndClose(Socks5.reply(.commandNotSupported))
            return false
        }
        if let failure = udp.exit.unavailable {
            context.refused(failure.label, "proxy request refused", peer, ["error": "\(failure)", "destination": "\(request.destination)"])
            await answerAndClose(Socks5.reply(failure.socksReply))
            return false
        }
        guard peerAddress != nil || remoteRelays != nil else {
            context.refused("unsupported_command", "proxy request refused", peer,
                            ["error": "UDP ASSOCIATE needs multiplexed data channels here (--mux 1 or more)", "destination": "\(request.destination)"])
            await answerAndClose(Socks5.reply(.commandNotSupported))
            return false
        }
        guard udp.admit() else {
            context.refused("udp_limit", "proxy request refused: UDP association limit reached", peer,
                            ["max": .stringConvertible(udp.maxAssociations)])
            await answerAndClose(Socks5.reply(.generalFailure))
            return false
        }
        let association: DatagramRelay
        switch await openRelay(request, udp) {
        case .failure(let failure):
            udp.release()
            await answerAndClose(Socks5.reply(failure.socksReply))
            return false
        case .success(let opened):
            association = opened
        }
        let reason = await serve(association, idleTimeout: udp.idleTimeout)
        client.channel.close()
        association.close()
        // Released before the close line, so whoever reads the line may open another.
        udp.release()
        var metadata: Logger.Metadata = [
            "peer": "\(peer)", "relay": "\(association.relayAddress)", "reason": "\(reason)",
            "datagrams_up": .stringConvertible(association.datagramsUp), "up": .stringConvertible(association.bytesUp),
            "datagrams_down": .stringConvertible(association.datagramsDown), "down": .stringConvertible(association.bytesDown),
        ]
        for (drop, count) in association.drops { metadata["dropped_\(drop.rawValue)"] = .stringConvertible(count) }
        context.logger.info("udp association closed", metadata: metadata)
        return false
    }

    /// The association's relay: a socket here on the address the client reached, or,
    /// for a client beyond the tunnel server, one there (`remoteRelays`). A failure is
    /// logged and returned for the reply.
    private func openRelay(_ request: Socks5.Request, _ udp: ProxyUDP) async -> Result<DatagramRelay, ProxyFailure> {
        let onDrop = { [context, peer] (reason: DatagramDrop) in
            if reason == .denied {
                context.refused("denied", "proxy datagram dropped", peer, ["error": "destination not allowed by policy"])
            }
        }
        if let remoteRelays {
            let opened = await remoteRelays.open(requested: request.destination.port, on: loop) { [client] why in
                client.channel.fail(.protocolViolation("UDP relay lost: \(why)"), reset: false)
            }
            if case .failure(let failure) = opened {
                context.refused(failure.label, "proxy request refused", peer, ["error": "\(failure)", "destination": "\(request.destination)"])
            }
            return opened
        }
        guard let peerAddress, let local = try? Net.localAddress(client.channel.duplex.fd) else {
            return .failure(.general("no address for the relay socket"))
        }
        do {
            return .success(try UDPAssociation(loop: loop, local: local, client: peerAddress, requested: request.destination.port,
                                               exit: udp.exit, batch: udp.batches.batch(for: loop), onDrop: onDrop))
        } catch {
            context.logger.warning("cannot open UDP relay socket", metadata: ["peer": "\(peer)", "error": "\(error)"])
            return .failure(.general("cannot open UDP relay socket: \(error)"))
        }
    }

    /// Answers the request with the relay's address, then waits for whatever ends the
    /// association; returns why it ended.
    private func serve(_ association: DatagramRelay, idleTimeout: Duration) async -> String {
        client.channel.send(Socks5.reply(.succeeded, bound: association.relayAddress))
        disarm()
        let idle = IdleWatch(loop: loop, timeout: idleTimeout, association: association) { [client] in
            client.channel.fail(.timedOut("udp association idle"), reset: false)
        }
        idleClients.enter(self) { [client] in client.channel.fail(.closed, reset: false) }
        defer {
            idleClients.leave(self)
            idle.cancel()
        }
        do {
            try await client.channel.flush()
            // The client has nothing to say on this stream any more; what it sends is dropped.
            while true { _ = try await client.channel.read(max: 4096) }
        } catch ChannelError.eof {
            return "client closed"
        } catch ChannelError.timedOut {
            return "idle timeout"
        } catch ChannelError.closed {
            return "shutdown"
        } catch {
            return "\(error)"
        }
    }
}

/// Ends an association after `timeout` without a datagram either way; checks at most
/// once per timeout, so a busy association costs no timer work per datagram.
///
/// Thread confinement: runs on `loop`.
private final class IdleWatch {
    private let loop: EventLoop
    private let timeout: Duration
    private unowned let association: DatagramRelay
    private let expired: () -> Void
    private var timer: LoopTimer?

    init(loop: EventLoop, timeout: Duration, association: DatagramRelay, expired: @escaping () -> Void) {
        self.loop = loop
        self.timeout = timeout
        self.association = association
        self.expired = expired
        check(after: timeout)
    }

    private func check(after delay: Duration) {
        timer = loop.schedule(after: delay) { [weak self] in
            guard let self else { return }
            let quiet = self.loop.now &- self.association.lastActivity
            let limit = self.timeout.nanoseconds
            if quiet >= limit {
                self.timer = nil
                self.expired()
            } else {
                self.check(after: .nanoseconds(Int64(limit - quiet)))
            }
        }
    }

    func cancel() {
        timer?.cancel()
        timer = nil
    }
}
