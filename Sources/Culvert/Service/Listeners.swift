import Logging
import Reactor
import Transfer

/// The listening sockets of one service on one loop, watched and stopped together: the
/// bind, watch and accept-error logging every command shares.
///
/// Thread confinement: `start` and `stop` run on `loop`.
final class Listeners {
    let loop: EventLoop
    private let logger: Logger
    private var acceptors: [Acceptor] = []

    init(loop: EventLoop, logger: Logger) {
        self.loop = loop
        self.logger = logger
    }

    /// The bound addresses, in the order given to `start`.
    var addresses: [SocketAddress] { acceptors.map(\.address) }

    /// Watches every bound socket; when one cannot be watched, stops all of them (closing
    /// every socket given) and throws.
    func start(_ bound: [(fd: Int32, address: SocketAddress)], onAccept: @escaping (Int32, SocketAddress?) -> Void) throws(SystemError) {
        loop.assertInLoop()
        for (i, (fd, address)) in bound.enumerated() {
            let acceptor = Acceptor(loop: loop, fd: fd, address: address, onAccept: onAccept,
                onError: { [logger] error in
                    logger.warning("accept failed", metadata: ["listen": "\(address)", "error": "\(error)"])
                })
            do {
                try acceptor.start()
            } catch {
                acceptor.stop()
                stop()
                for (rest, _) in bound.dropFirst(i + 1) { Posix.close(rest) }
                throw error
            }
            acceptors.append(acceptor)
        }
    }

    /// Stops accepting and closes the listening sockets.
    func stop() {
        loop.assertInLoop()
        for a in acceptors { a.stop() }
        acceptors.removeAll()
    }

    /// Resolves `spec` (off the loop for names) and listens on every address it names;
    /// all or nothing.
    static func bind(_ spec: HostPort, on loop: EventLoop, reusePort: Bool) async throws -> [(fd: Int32, address: SocketAddress)] {
        let addresses = try await Resolver.resolve(host: spec.host, port: spec.port, passive: true, on: loop)
        var bound: [(fd: Int32, address: SocketAddress)] = []
        for address in addresses {
            do throws(SystemError) {
                let fd = try Net.listen(address, reusePort: reusePort)
                do {
                    bound.append((fd, try Net.localAddress(fd)))
                } catch {
                    Posix.close(fd)
                    throw error
                }
            } catch {
                for (fd, _) in bound { Posix.close(fd) }
                throw ListenError(address: spec, error: error)
            }
        }
        return bound
    }
}

/// A listening address could not be bound; the message names it.
public struct ListenError: Error, CustomStringConvertible {
    public let address: HostPort
    public let error: SystemError
    public var description: String { "cannot listen on \(address): \(error)" }
}
