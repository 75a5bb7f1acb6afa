#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// One end of a byte stream that the copier moves bytes from and to: a plain TCP socket
/// today, a TLS or zlib layer over one later. Readiness is edge-triggered, so each end
/// remembers whether it may be read or written until a call says EAGAIN.
public protocol Duplex: AnyObject {
    /// The descriptor to register with the loop.
    var fd: Int32 { get }
    /// True when the socket's bytes are the stream's bytes (no layer), so splice may move them.
    var isSpliceable: Bool { get }
    var readReady: Bool { get set }
    var writeReady: Bool { get set }
    func read(into buffer: UnsafeMutableRawPointer, count: Int) -> IOResult
    func write(from buffer: UnsafeRawPointer, count: Int) -> IOResult
    /// Ends our sending side (TCP FIN) while reading goes on: half-close.
    func shutdownWrite() -> SystemError?
    /// Releases the descriptor; `reset` makes the peer see RST instead of FIN.
    func close(reset: Bool)
}

/// A connected, non-blocking TCP socket.
public final class TCPStream: Duplex {
    public let fd: Int32
    public var readReady = true
    public var writeReady = true
    private var isClosed = false

    public init(fd: Int32) {
        self.fd = fd
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { if !isClosed { Posix.close(fd) } }

    public var isSpliceable: Bool { true }

    public func read(into buffer: UnsafeMutableRawPointer, count: Int) -> IOResult {
        Net.read(fd, buffer, count)
    }

    public func write(from buffer: UnsafeRawPointer, count: Int) -> IOResult {
        Net.write(fd, buffer, count)
    }

    public func shutdownWrite() -> SystemError? { Net.shutdownWrite(fd) }

    public func close(reset: Bool) {
        guard !isClosed else { return }
        isClosed = true
        if reset { Net.closeWithReset(fd) } else { Posix.close(fd) }
    }
}
