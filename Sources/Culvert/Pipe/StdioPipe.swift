import Logging
import Reactor
import Transfer

/// `culvert pipe HOST:PORT`: joins stdin/stdout to one TCP connection, as ssh's
/// ProxyCommand wants. EOF on stdin half-closes the connection; the remote end closing
/// ends the command (exit 0), a reset or error ends it with 1. SIGHUP, SIGINT or SIGTERM
/// (ssh sends SIGHUP when its session ends) give the connection a moment to close by
/// itself, then end it; either way the exit is 0.
public final class StdioPipe: DrainableService, @unchecked Sendable {
    private var relay: CopyBidirectional?
    /// Set by a stop signal: ending then is a success (exit 0), like every command.
    private var stopping = false
    /// A stop waiting for the connection to end by itself.
    private var onEnded: (() -> Void)?

    private init() {}

    /// Stdin/stdout to `HOST:PORT`.
    public static func start(target: HostPort, connectTimeout: Duration, group: LoopGroup, logger: Logger,
                             control: ServiceControl) async throws -> StdioPipe {
        let loop = group.main
        let addresses = try await Resolver.resolve(host: target.host ?? "127.0.0.1", port: target.port, passive: false, on: loop)
        let fd: Int32
        do {
            fd = try await Connector.connect(to: addresses, timeout: connectTimeout, on: loop)
        } catch {
            throw PipeError(target: "\(target)", underlying: error)
        }
        return try join(TCPStream(fd: fd), name: "\(target)", loop: loop, logger: logger, control: control)
    }

    /// Stdin/stdout to the secret service `name` behind a culvert server.
    public static func start(visiting name: String, serviceToken: String?, config: TunnelClientConfig, group: LoopGroup,
                             logger: Logger, control: ServiceControl) async throws -> StdioPipe {
        let loop = group.main
        let connector = try TunnelConnector(loop: loop, config: config)
        let remote: Duplex
        do {
            remote = try await SecretVisit.open(connector, name: name, serviceToken: serviceToken ?? config.token, heartbeat: config.heartbeat)
        } catch let e as FatalClientError {
            throw PipeError(target: "secret:\(name)", underlying: e)
        }
        return try join(remote, name: "secret:\(name)", loop: loop, logger: logger, control: control)
    }

    private static func join(_ remote: Duplex, name: String, loop: EventLoop, logger: Logger, control: ServiceControl) throws -> StdioPipe {
        let pipe = StdioPipe()
        let relay = CopyBidirectional(loop: loop, resources: LoopResources(), a: StdioStream(), b: remote,
                                      preferSplice: false, endsWithBToA: true) { relay, reason in
            logger.debug("connection closed", metadata: [
                "target": "\(name)", "up": .stringConvertible(relay.bytesAToB), "down": .stringConvertible(relay.bytesBToA),
                "reason": "\(reason.label)",
            ])
            if case .reset(let e) = reason, !pipe.stopping { logger.error("connection to \(name) failed: \(e)") }
            control.exit(status: reason == .eof || pipe.stopping ? 0 : 1)
            pipe.onEnded?()
        }
        pipe.relay = relay
        try relay.start()
        return pipe
    }

    public func drain(timeout: Duration) async {
        stopping = true
        guard let relay, !relay.isClosed else { return }
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            let deadline = relay.loop.schedule(after: timeout) { relay.abort(.drainTimeout) }
            onEnded = { [weak self] in
                deadline.cancel()
                self?.onEnded = nil
                done.resume()
            }
        }
    }
}

/// The pipe's target could not be reached.
struct PipeError: Error, CustomStringConvertible {
    let target: String
    let underlying: Error
    var description: String { "cannot connect to \(target): \(underlying)" }
}
