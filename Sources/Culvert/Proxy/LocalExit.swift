import Reactor
import Transfer

/// The exit of `culvert proxy`: resolves names on culvert's resolver pool, applies the
/// policy to the name and then to every address, and connects to the allowed addresses
/// in the resolver's order until one answers.
final class LocalExit: ProxyExit {
    private let policy: ProxyPolicy
    private let resolver: CachingResolver
    private let connectTimeout: Duration

    init(policy: ProxyPolicy, resolver: CachingResolver, connectTimeout: Duration) {
        self.policy = policy
        self.resolver = resolver
        self.connectTimeout = connectTimeout
    }

    func connect(to destination: ProxyDestination, on loop: EventLoop) async -> Result<ProxyExitStream, ProxyFailure> {
        var allowedByName = false
        let candidates: [SocketAddress]
        switch destination {
        case .address(let address):
            candidates = [address]
        case .name(let host, let port):
            switch policy.check(name: host, port: port) {
            case .denied: return .failure(.notAllowed)
            case .resolve(let byName): allowedByName = byName
            }
            switch await resolver.resolve(host: host, port: port, on: loop) {
            case .success(let found): candidates = found
            case .failure(.timedOut): return .failure(.timedOut)
            case .failure(.busy): return .failure(.general("resolver queue full"))
            case .failure(.notFound(let why)): return .failure(.nameNotFound(why))
            }
        }
        let addresses = candidates.filter { policy.admits($0, allowedByName: allowedByName) }
        guard !addresses.isEmpty else { return .failure(.notAllowed) }
        if Task.isCancelled { return .failure(.general("cancelled")) }
        // Each address gets a share of the time, at least a second, so one that drops
        // packets leaves time for the next family to answer.
        let perAttempt = max(.seconds(1), connectTimeout / addresses.count)
        let dial = DialHandle()
        let outcome: Connector.Outcome = await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let connector = Connector(loop: loop, addresses: addresses, timeout: perAttempt) { _, outcome in
                    continuation.resume(returning: outcome)
                }
                dial.connector = connector
                connector.start()
            }
        } onCancel: {
            loop.execute { dial.connector?.cancel() }
        }
        dial.connector = nil
        switch outcome {
        case .connected(let fd, let registration, let index):
            if let registration { loop.deregister(fd: fd, registration: registration) }
            return .success(ProxyExitStream(stream: TCPStream(fd: fd), remote: addresses[index], local: try? Net.localAddress(fd)))
        case .exhausted(_, let lastError):
            return .failure(ProxyFailure(connect: lastError))
        case .cancelled:
            return .failure(.general("cancelled"))
        }
    }
}

/// The connector of a dial in flight, for a cancellation that arrives from outside the
/// task; touched on the dial's loop only.
private final class DialHandle: @unchecked Sendable {
    var connector: Connector?
}
