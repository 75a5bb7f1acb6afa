#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// One end of a byte stream that the copier moves bytes from and to: a plain TCP socket
/// today, a TLS or zlib layer over one later. Readiness is edge-triggered, so each end
/// remembers whether it may be read or written until a call says EAGAIN.
public protocol Duplex: AnyObject {
    /// The descriptor to register with the loop (and to read from).
    var fd: Int32 { get }
    /// The descriptor written to; differs from `fd` only for stdin/stdout.
    var writeFD: Int32 { get }
    /// Whether `close` closes the descriptors (so epoll forgets them by itself).
    var closesDescriptors: Bool { get }
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
    /// A stream without a descriptor of its own (a multiplexed stream) takes the
    /// handler to wake and answers true; a socket-backed one answers false and is
    /// registered with the loop.
    /// - Parameter peerTakesPipes: the copier can splice what this stream lends as a
    ///   pipe straight into the other end (a plain socket), so the stream may receive
    ///   bulk bytes into a pipe instead of user memory.
    func attachVirtual(_ handler: EventHandler, tag: UInt8, peerTakesPipes: Bool) -> Bool
    /// A stream that already holds received bytes (a multiplexed stream) lends them: the
    /// copier writes them out from there (memory) or splices them (a pipe) and calls
    /// `consumeBorrowed` with what it wrote, instead of copying them into a buffer
    /// first. nil: not supported.
    func borrowReadable() -> Borrowed?
    func consumeBorrowed(_ count: Int)
    /// The error the stream has hit (SO_ERROR for a socket), 0 when none: asked when the
    /// loop reports an error, since a direction that is not reading would not see it.
    func pendingError() -> Int32
    /// Whether the stream takes bytes straight out of a pipe (`write(fromPipe:count:)`):
    /// a plain socket, or a multiplexed stream that splices into its plain carrier.
    var acceptsPipe: Bool { get }
    /// Writes up to `count` of the bytes waiting in the pipe `fd`; what it reports as
    /// written has left the pipe. Only called when `acceptsPipe` is true.
    func write(fromPipe fd: Int32, count: Int) -> IOResult
    /// A layered stream with an output buffer of its own (TLS) takes a whole frame in one
    /// call: it encodes header and body now and sends what the socket takes; the rest
    /// waits in its buffer (`bufferedOutput`) for `flushBuffered` or the next write. It
    /// answers `.bytes` of everything or `.failed`, never less; nil: not supported (the
    /// caller queues the frame and writes it the ordinary way).
    func writeThrough(header: UnsafeRawPointer, _ headerCount: Int, body: UnsafeRawPointer, _ bodyCount: Int) -> IOResult?
    /// Bytes taken by `writeThrough` that have not reached the socket yet.
    var bufferedOutput: Int { get }
    /// Sends buffered output: `.bytes(0)` once it is all out, else `.wouldBlock`.
    func flushBuffered() -> IOResult
}

/// What `borrowReadable` lends: received bytes, or why there are none.
public enum Borrowed {
    case bytes(UnsafeRawBufferPointer)
    /// `count` bytes waiting in a pipe, read end `fd`: lent only to a copier whose
    /// other end said it takes pipes (`attachVirtual(peerTakesPipes:)`).
    case pipe(fd: Int32, count: Int)
    case wouldBlock
    case eof
    case failed(SystemError)
}

extension Duplex {
    public var writeFD: Int32 { fd }
    public var closesDescriptors: Bool { true }
    public func attachVirtual(_ handler: EventHandler, tag: UInt8, peerTakesPipes: Bool) -> Bool { false }
    public func attachVirtual(_ handler: EventHandler, tag: UInt8) -> Bool {
        attachVirtual(handler, tag: tag, peerTakesPipes: false)
    }
    public func borrowReadable() -> Borrowed? { nil }
    public func consumeBorrowed(_ count: Int) {}
    public func pendingError() -> Int32 { fd >= 0 ? Net.pendingError(fd) : 0 }
    public var acceptsPipe: Bool { isSpliceable }
    /// A plain socket: splice.
    public func write(fromPipe fd: Int32, count: Int) -> IOResult {
        isSpliceable ? Net.splice(from: fd, to: writeFD, count) : .failed(SystemError("write", errno: EINVAL))
    }
    public func writeThrough(header: UnsafeRawPointer, _ headerCount: Int, body: UnsafeRawPointer,
                             _ bodyCount: Int) -> IOResult? { nil }
    public var bufferedOutput: Int { 0 }
    public func flushBuffered() -> IOResult { .bytes(0) }
}

/// A connected, non-blocking TCP socket.
public final class TCPStream: Duplex {
    public let fd: Int32
    public var readReady = true
    public var writeReady = true
    private var isClosed = false

    /// - Parameter noDelay: set TCP_NODELAY; false for accepted sockets, which inherit
    ///   it from a listener that has it.
    public init(fd: Int32, noDelay: Bool = true) {
        self.fd = fd
        if noDelay {
            var one: Int32 = 1
            _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        }
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

/// The process's stdin and stdout as one stream (`culvert pipe`). Both are made
/// non-blocking while culvert runs and put back as they were on close, so a terminal
/// is not left in non-blocking mode.
public final class StdioStream: Duplex {
    public let fd: Int32 = 0
    public let writeFD: Int32 = 1
    public var closesDescriptors: Bool { false }
    public var readReady = true
    public var writeReady = true
    private let savedFlags: (Int32, Int32)
    private var isClosed = false

    public init() {
        savedFlags = (fcntl(0, F_GETFL), fcntl(1, F_GETFL))
        _ = fcntl(0, F_SETFL, savedFlags.0 | O_NONBLOCK)
        _ = fcntl(1, F_SETFL, savedFlags.1 | O_NONBLOCK)
    }

    deinit { close(reset: false) }

    public var isSpliceable: Bool { false }

    /// A pipe or terminal has no pending socket error to ask for (SO_ERROR would say
    /// ENOTSOCK): its failures come back from read and write, and a reader of stdout
    /// that went away is the normal end of an ssh ProxyCommand session, not an error.
    public func pendingError() -> Int32 { 0 }

    public func read(into buffer: UnsafeMutableRawPointer, count: Int) -> IOResult {
        Net.read(0, buffer, count)
    }

    public func write(from buffer: UnsafeRawPointer, count: Int) -> IOResult {
        while true {
            let n = Glibc.write(1, buffer, count)
            if n >= 0 { return .bytes(n) }
            if errno == EINTR { continue }
            if errno == EAGAIN { return .wouldBlock }
            return .failed(SystemError("write", errno: errno))
        }
    }

    /// EOF for whoever reads our stdout.
    public func shutdownWrite() -> SystemError? {
        _ = fcntl(1, F_SETFL, savedFlags.1)
        let devnull = open("/dev/null", O_WRONLY)
        if devnull >= 0 {
            _ = dup2(devnull, 1)
            Posix.close(devnull)
        }
        return nil
    }

    public func close(reset: Bool) {
        guard !isClosed else { return }
        isClosed = true
        _ = fcntl(0, F_SETFL, savedFlags.0)
        _ = fcntl(1, F_SETFL, savedFlags.1)
    }
}
