#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// Accepts connections on one listening socket owned by one loop.
///
/// When the process runs out of descriptors (EMFILE/ENFILE) it pauses for a moment and
/// tries again from a timer: the listener stays up and the loop never spins.
///
/// Thread confinement: started, driven and stopped on its loop.
public final class Acceptor: EventHandler {
    public let loop: EventLoop
    public let fd: Int32
    public let address: SocketAddress
    private var registration: Registration?
    private var retryTimer: LoopTimer?
    private let onAccept: (Int32, SocketAddress?) -> Void
    private let onError: (SystemError) -> Void
    public static let pauseAfterDescriptorExhaustion: Duration = .milliseconds(100)

    public init(loop: EventLoop, fd: Int32, address: SocketAddress,
                onAccept: @escaping (Int32, SocketAddress?) -> Void,
                onError: @escaping (SystemError) -> Void) {
        self.loop = loop
        self.fd = fd
        self.address = address
        self.onAccept = onAccept
        self.onError = onError
    }

    public func start() throws(SystemError) {
        loop.assertInLoop()
        registration = try loop.register(fd: fd, interest: .read, handler: self)
        acceptAll()
    }

    /// Stops accepting and closes the listening socket.
    public func stop() {
        loop.assertInLoop()
        retryTimer?.cancel()
        retryTimer = nil
        if let r = registration {
            loop.deregister(fd: fd, registration: r)
            registration = nil
        }
        Posix.close(fd)
    }

    public var isAccepting: Bool { registration != nil }

    public func handleEvents(_ events: UInt32, tag: UInt8) {
        acceptAll()
    }

    private func acceptAll() {
        guard registration != nil, retryTimer == nil else { return }
        while true {
            do {
                guard let (client, peer) = try Net.accept(fd) else { return }
                onAccept(client, peer)
            } catch {
                onError(error)
                if error.errno == EMFILE || error.errno == ENFILE || error.errno == ENOBUFS || error.errno == ENOMEM {
                    retryTimer = loop.schedule(after: Self.pauseAfterDescriptorExhaustion) { [unowned self] in
                        retryTimer = nil
                        acceptAll()
                    }
                }
                return
            }
        }
    }
}
