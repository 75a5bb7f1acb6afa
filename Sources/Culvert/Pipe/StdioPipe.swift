import Logging
import Reactor
import Transfer

/// `culvert pipe HOST:PORT`: joins stdin/stdout to one TCP connection, as ssh's
/// ProxyCommand wants. EOF on stdin half-closes the connection; the remote end closing
/// ends the command (exit 0), a reset or error ends it with 1.
public final class StdioPipe: DrainableService, @unchecked Sendable {
    private var relay: CopyBidirectional?

    private init() {}

    public static func start(target: HostPort, connectTimeout: Duration, group: LoopGroup, logger: Logger,
                             control: ServiceControl) async throws -> StdioPipe {
        let loop = group.main
        let addresses = try await Resolver.resolve(host: target.host ?? "127.0.0.1", port: target.port, passive: false, on: loop)
        var fd: Int32?
        var lastError: Error = SystemError("connect", errno: 111)
        for address in addresses {
            do {
                fd = try await AsyncConnect.connect(to: address, timeout: connectTimeout, on: loop)
                break
            } catch {
                lastError = error
            }
        }
        guard let fd else { throw PipeError(target: target, underlying: lastError) }
        let pipe = StdioPipe()
        let relay = CopyBidirectional(loop: loop, resources: LoopResources(), a: StdioStream(), b: TCPStream(fd: fd),
                                      preferSplice: false, endsWithBToA: true) { relay, reason in
            logger.debug("connection closed", metadata: [
                "target": "\(target)", "up": .stringConvertible(relay.bytesAToB), "down": .stringConvertible(relay.bytesBToA),
                "reason": "\(reason.label)",
            ])
            if case .reset(let e) = reason { logger.error("connection to \(target) failed: \(e)") }
            control.exit(status: reason == .eof ? 0 : 1)
        }
        pipe.relay = relay
        try relay.start()
        return pipe
    }

    public func drain(timeout: Duration) async {
        relay?.abort(.drainTimeout)
    }
}

/// The pipe's target could not be reached.
struct PipeError: Error, CustomStringConvertible {
    let target: HostPort
    let underlying: Error
    var description: String { "cannot connect to \(target): \(underlying)" }
}
