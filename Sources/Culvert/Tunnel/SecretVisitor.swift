import Logging
import Reactor
import Transfer

/// A visit to a secret service failed for a reason the user should see.
public struct VisitError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// The visitor's side of a secret service: authenticate to the server as a client, ask
/// for the service by name, then prove the service token to the exposing client (and
/// check its proof) end to end. The result is a raw stream to the service.
enum SecretVisit {
    static func open(_ connector: TunnelConnector, name: String, serviceToken: String, heartbeat: Heartbeat) async throws -> Duplex {
        let channel = try await connector.openChannel()
        _ = try await connector.authenticate(channel, poolSize: 0, muxChannels: 0, heartbeat: heartbeat)
        let timer = connector.loop.schedule(after: connector.handshakeTimeout) { channel.fail(.timedOut("visit")) }
        defer { timer.cancel() }
        do {
            channel.send(TunnelProtocol.encode(.visit(name: name)))
            switch try await TunnelProtocol.read(TunnelProtocol.VisitAnswer.self, from: channel) {
            case .visitAccepted: break
            case .refused(let refusal): throw VisitError(message: "server refused the visit: \(refusal.reason)")
            case .serviceChallenge, .serviceReady: throw ChannelError.protocolViolation("expected the server's answer to the visit")
            }
            let key = TunnelProtocol.secretKey(serviceToken: serviceToken, name: name)
            let visitorNonce = TunnelCrypto.random(TunnelProtocol.nonceSize)
            channel.send(TunnelProtocol.encode(.serviceHello(visitorNonce: visitorNonce)))
            switch try await TunnelProtocol.read(TunnelProtocol.VisitAnswer.self, from: channel) {
            case .serviceChallenge(let exposerNonce, let exposerProof):
                let expected = TunnelProtocol.exposerProof(key: key, name: name, visitorNonce: visitorNonce, exposerNonce: exposerNonce)
                guard TunnelCrypto.constantTimeEqual(exposerProof, expected) else {
                    throw VisitError(message: "wrong service token: the exposing client could not prove the token of '\(name)'")
                }
                channel.send(TunnelProtocol.encode(.serviceProof(visitorProof: TunnelProtocol.visitorProof(
                    key: key, name: name, visitorNonce: visitorNonce, exposerNonce: exposerNonce))))
            case .refused(let refusal): throw VisitError(message: "service '\(name)' refused the visit: \(refusal.reason)")
            case .visitAccepted, .serviceReady: throw ChannelError.protocolViolation("expected the service's challenge")
            }
            switch try await TunnelProtocol.read(TunnelProtocol.VisitAnswer.self, from: channel) {
            case .serviceReady: break
            case .refused(let refusal): throw VisitError(message: "service '\(name)' refused the visit: \(refusal.reason)")
            case .visitAccepted, .serviceChallenge: throw ChannelError.protocolViolation("expected the service to be ready")
            }
            try await channel.flush()
            return channel.detach()
        } catch {
            channel.fail(.closed)
            throw error
        }
    }
}

/// `culvert client SERVER --visit NAME -L [BIND:]PORT`: a local listener whose every
/// connection is relayed to the secret service NAME through the server.
public final class VisitorListener: DrainableService, @unchecked Sendable {
    private let connector: TunnelConnector
    private let name: String
    private let serviceToken: String
    private let config: TunnelClientConfig
    private let logger: Logger
    private let loop: EventLoop
    private let relays: RelaySet
    private let listeners: Listeners

    private init(connector: TunnelConnector, name: String, serviceToken: String, config: TunnelClientConfig, logger: Logger, loop: EventLoop) {
        self.connector = connector
        self.name = name
        self.serviceToken = serviceToken
        self.config = config
        self.logger = logger
        self.loop = loop
        relays = RelaySet(loop: loop, resources: LoopResources(), logger: logger)
        listeners = Listeners(loop: loop, logger: logger)
    }

    public static func start(config: TunnelClientConfig, name: String, serviceToken: String?, listen: HostPort,
                             group: LoopGroup, logger: Logger) async throws -> VisitorListener {
        let loop = group.main
        let visitor = VisitorListener(connector: try TunnelConnector(loop: loop, config: config), name: name,
                                      serviceToken: serviceToken ?? config.token, config: config, logger: logger, loop: loop)
        let bound = try await Listeners.bind(listen, on: loop, reusePort: false)
        try visitor.listeners.start(bound) { [unowned visitor] fd, peer in visitor.accepted(fd, peer: peer?.description ?? "?") }
        for address in visitor.listeners.addresses {
            ReadyLine.print("listening visit \(address) -> \(name)")
        }
        return visitor
    }

    private func accepted(_ fd: Int32, peer: String) {
        let pending = relays.add()
        Task(executorPreference: loop.tasks) { [self] in
            defer { relays.remove(pending: pending) }
            let remote: Duplex
            do {
                remote = try await SecretVisit.open(connector, name: name, serviceToken: serviceToken, heartbeat: config.heartbeat)
            } catch {
                Net.closeWithReset(fd)
                logger.error("visit failed", metadata: ["peer": "\(peer)", "service": "\(name)", "error": "\(error)"])
                return
            }
            relays.start(a: TCPStream(fd: fd), b: remote, peer: peer) { [logger, name] relay, reason in
                logger.connectionClosed(peer: peer, "target", "secret:\(name)", relay: relay, reason: reason)
            }
        }
    }

    public func drain(timeout: Duration) async {
        listeners.stop()
        await RelaySet.drain([relays], on: loop, timeout: timeout, logger: logger)
    }
}
