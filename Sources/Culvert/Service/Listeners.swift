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
    /// Counts accept failures past the first few (a descriptor shortage repeats every
    /// pause); without it each failure is logged.
    private let refusals: RefusalSummary?
    private var acceptors: [Acceptor] = []

    init(loop: EventLoop, logger: Logger, refusals: RefusalSummary? = nil) {
        self.loop = loop
        self.logger = logger
        self.refusals = refusals
    }

    /// The bound addresses, in the order given to `start`.
    var addresses: [SocketAddress] { acceptors.map(\.address) }

    /// Watches every bound socket; when one cannot be watched, stops all of them (closing
    /// every socket given) and throws.
    func start(_ bound: [(fd: Int32, address: SocketAddress)], onAccept: @escaping (Int32, SocketAddress?) -> Void) throws(SystemError) {
        loop.assertInLoop()
        for (i, (fd, address)) in bound.enumerated() {
            let acceptor = Acceptor(loop: loop, fd: fd, address: address, onAccept: onAccept,
                onError: { [logger, refusals] error in
                    guard refusals?.record("accept_failed") ?? true else { return }
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

/// A listening address could not be bound: exit status 1, not a usage error.
public struct ListenError: Error, CustomStringConvertible {
    public let address: HostPort
    public let error: SystemError
    public var description: String { "cannot listen on \(address): \(error)" }
}

/// Listening sockets spread over loops: for each listen address, one SO_REUSEPORT socket
/// per loop, so each loop accepts (or receives) on its own socket and keeps what arrives
/// (forwarders, the tunnel server).
struct LoopListeners {
    typealias Listener = (fd: Int32, address: SocketAddress)

    /// The addresses actually bound (port 0 replaced by the port the kernel chose).
    let bound: [SocketAddress]
    /// `perLoop[i]` are loop i's sockets, one per bound address.
    let perLoop: [[Listener]]

    /// Binds everything or nothing: on failure every socket opened so far is closed.
    static func bind(_ addresses: [SocketAddress], loops: Int, spec: HostPort,
                     open: (SocketAddress) throws(SystemError) -> Int32) throws(ListenError) -> LoopListeners {
        var bound: [SocketAddress] = []
        var perLoop: [[Listener]] = Array(repeating: [], count: loops)
        do throws(SystemError) {
            for requested in addresses {
                var address = requested
                for i in 0..<loops {
                    let fd = try open(address)
                    if i == 0 {
                        do throws(SystemError) {
                            address = try Net.localAddress(fd)
                        } catch {
                            Posix.close(fd)
                            throw error
                        }
                        bound.append(address)
                    }
                    perLoop[i].append((fd, address))
                }
            }
        } catch {
            for listeners in perLoop { for l in listeners { Posix.close(l.fd) } }
            throw ListenError(address: spec, error: error)
        }
        return LoopListeners(bound: bound, perLoop: perLoop)
    }
}

