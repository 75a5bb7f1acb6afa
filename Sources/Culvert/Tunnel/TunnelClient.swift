#if canImport(Glibc)
import Glibc
#endif
import Logging
import Reactor
import Transfer

/// A failure that retrying cannot fix: the process exits 1 with this message.
struct FatalClientError: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}

/// `culvert client`: keeps a control channel to the server (reconnecting with
/// exponential backoff and jitter, forever), registers the services, and answers each
/// data-channel request with a fresh, authenticated connection that is later paired
/// with a visitor and relayed to the local service.
///
/// Thread confinement: everything runs on `loop`.
public final class TunnelClient: DrainableService, @unchecked Sendable {
    let config: TunnelClientConfig
    let loop: EventLoop
    let logger: Logger
    private let keys: TokenKeys
    private let tls: TLSContext?
    private let control: ServiceControl
    let resources = LoopResources()
    private var serverAddresses: [SocketAddress] = []
    private var everConnected = false
    private var announced: Set<UInt32> = []
    private var stopping = false
    private var current: ClientSession?
    var activeRelays: [ObjectIdentifier: CopyBidirectional] = [:]
    private var onIdle: (() -> Void)?

    private init(config: TunnelClientConfig, loop: EventLoop, logger: Logger, tls: TLSContext?, control: ServiceControl) {
        self.config = config
        self.loop = loop
        self.logger = logger
        self.tls = tls
        self.control = control
        keys = TokenKeys(token: config.token)
    }

    public static func start(config: TunnelClientConfig, group: LoopGroup, logger: Logger, control: ServiceControl) async throws -> TunnelClient {
        let keys = TokenKeys(token: config.token)
        let tls: TLSContext?
        switch config.transport {
        case .plain: tls = nil
        case .tls:
            if config.caFile != nil || config.fingerprint != nil {
                tls = try TLSContext.client(caFile: config.caFile)
            } else {
                tls = try TLSContext.psk(key: keys.tlsPSK, server: false)
            }
        }
        if config.transport == .plain {
            logger.warning("transport is plain: tunnel traffic is not encrypted")
        }
        let client = TunnelClient(config: config, loop: group.main, logger: logger, tls: tls, control: control)
        Task(executorPreference: group.main.tasks) { await client.run() }
        return client
    }

    // MARK: the reconnect loop

    private func run() async {
        var failures = 0
        while !stopping {
            do {
                if serverAddresses.isEmpty {
                    serverAddresses = try await Resolver.resolve(host: config.server.host ?? "127.0.0.1", port: config.server.port, passive: false, on: loop)
                }
                let established = try await runSession()
                if established { failures = 0 }
            } catch let fatal as FatalClientError {
                logger.critical("\(fatal.message)")
                FatalOutput.write(fatal.message)
                control.exit(status: 1)
                return
            } catch {
                logger.warning("cannot reach server", metadata: ["target": "\(config.server)", "error": "\(error)"])
                serverAddresses = []
            }
            if stopping { return }
            failures += 1
            let base = config.reconnectInitial.nanoseconds << UInt64(min(failures - 1, 20))
            let capped = min(base, config.reconnectMax.nanoseconds)
            let delay = Duration.nanoseconds(Int64(Double(capped) * Double.random(in: 0.5...1.0)))
            logger.info("reconnecting", metadata: ["delay": "\(DurationSpec.format(delay))", "attempt": .stringConvertible(failures)])
            await loop.sleep(for: delay)
        }
    }

    /// Opens a connection to the server, TLS included, and checks a pinned fingerprint.
    func openChannel() async throws -> AsyncDuplex {
        var lastError: Error = ChannelError.closed
        for address in serverAddresses {
            let fd: Int32
            do {
                fd = try await AsyncConnect.connect(to: address, timeout: config.connectTimeout, on: loop)
            } catch {
                lastError = error
                continue
            }
            let stream: Duplex
            do {
                stream = try tls.map { try TLSStream(fd: fd, context: $0, serverName: config.caFile == nil ? nil : config.server.host) } ?? TCPStream(fd: fd)
            } catch {
                Posix.close(fd)
                throw error
            }
            let channel = try AsyncDuplex(loop: loop, duplex: stream)
            let timer = loop.schedule(after: config.handshakeTimeout) { channel.fail(.timedOut("TLS handshake")) }
            defer { timer.cancel() }
            do {
                try await channel.handshake()
            } catch let e as TLSError where e.isRejection {
                channel.fail(.closed)
                throw FatalClientError(message: "authentication failed: the server rejected the TLS handshake (\(e.message)); check the token, --ca or --fingerprint")
            }
            if let pinned = config.fingerprint, let tlsStream = stream as? TLSStream {
                guard let actual = tlsStream.peerFingerprint(), TunnelCrypto.constantTimeEqual(actual, pinned) else {
                    channel.fail(.closed)
                    throw FatalClientError(message: "authentication failed: server certificate fingerprint does not match --fingerprint")
                }
            }
            return channel
        }
        throw lastError
    }

    /// One control session: handshake, service registration, then serving requests until
    /// the channel dies. Returns whether the session got as far as authentication.
    private func runSession() async throws -> Bool {
        let channel = try await openChannel()
        let timer = loop.schedule(after: config.handshakeTimeout) { channel.fail(.timedOut("handshake")) }
        let clientNonce = TunnelCrypto.random(TunnelProtocol.nonceSize)
        let sessionID: [UInt8]
        let sessionKey: [UInt8]
        do {
            channel.send(TunnelProtocol.encode(.controlHello(version: TunnelProtocol.version, clientNonce: clientNonce)))
            let challenge = try await TunnelProtocol.read(from: channel)
            if case .refused(let reason) = challenge { throw FatalClientError(message: "server refused: \(reason)") }
            guard case .challenge(_, let serverNonce, let serverProof) = challenge else {
                throw ChannelError.protocolViolation("expected a challenge from the server")
            }
            let expected = TunnelProtocol.serverProof(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce)
            guard TunnelCrypto.constantTimeEqual(serverProof, expected) else {
                channel.close()
                throw FatalClientError(message: "authentication failed: the server could not prove it knows the token")
            }
            channel.send(TunnelProtocol.encode(.clientAuth(
                clientProof: TunnelProtocol.clientProof(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce),
                poolSize: UInt16(config.pool), heartbeatMillis: UInt32(config.heartbeat.interval.nanoseconds / 1_000_000))))
            switch try await TunnelProtocol.read(from: channel) {
            case .welcome(let id):
                sessionID = id
            case .refused(let reason):
                channel.close()
                if reason == "authentication failed" { throw FatalClientError(message: "authentication failed") }
                throw ChannelError.protocolViolation("server refused: \(reason)")
            default:
                throw ChannelError.protocolViolation("expected welcome from the server")
            }
            sessionKey = TunnelProtocol.sessionKey(key: keys.auth, clientNonce: clientNonce, serverNonce: serverNonce)
            timer.cancel()
        } catch {
            timer.cancel()
            channel.fail(.closed)
            throw error
        }
        logger.info("connected to server", metadata: ["target": "\(config.server)"])
        let session = ClientSession(client: self, control: channel, id: sessionID, key: sessionKey)
        current = session
        let firstSession = !everConnected
        everConnected = true
        defer { current = nil }
        try await session.run(firstSession: firstSession)
        return true
    }

    /// Prints the ready line the first time a service becomes reachable.
    func serviceExposed(_ spec: ServiceSpec, id: UInt32, address: String) {
        var shown = address
        if let bound = try? HostPort.parse(address), let host = bound.host, host == "0.0.0.0" || host == "::" {
            shown = HostPort(host: config.server.host, port: bound.port).description
        }
        logger.info("service exposed", metadata: ["listen": "\(shown)", "target": "\(spec.localDescription)"])
        if announced.insert(id).inserted {
            ReadyLine.print("exposed tcp \(shown) -> \(spec.localDescription)")
        }
    }

    /// A refusal at first start ends the process (like ssh's ExitOnForwardFailure).
    func serviceRefused(_ spec: ServiceSpec, reason: String, firstSession: Bool) throws {
        let message = "server refused service \(spec.name): \(reason)"
        if firstSession { throw FatalClientError(message: message) }
        logger.error("\(message)")
    }

    func relayEnded() {
        guard stopping, activeRelays.isEmpty, let done = onIdle else { return }
        onIdle = nil
        done()
    }

    public func drain(timeout: Duration) async {
        stopping = true
        current?.end()
        if activeRelays.isEmpty { return }
        logger.notice("draining", metadata: ["connections": .stringConvertible(activeRelays.count)])
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            let deadline = loop.schedule(after: timeout) { [self] in
                for r in Array(activeRelays.values) { r.abort(.drainTimeout) }
            }
            onIdle = {
                deadline.cancel()
                done.resume()
            }
        }
    }
}

/// Messages for the user that must reach stderr even with JSON logs.
enum FatalOutput {
    static func write(_ message: String) {
        writeLine("culvert: \(message)", to: 2)
    }
}
