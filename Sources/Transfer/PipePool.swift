#if canImport(Glibc)
import Glibc
#endif
import CCulvert
import Reactor

/// A kernel pipe used as the splice carrier between two sockets.
public struct Pipe {
    public let readFD: Int32
    public let writeFD: Int32
    public let capacity: Int
}

/// Per-loop pool of empty pipes. A connection takes one only while it has bytes in
/// flight and gives it back empty, so idle connections hold no pipe. A pipe that still
/// holds bytes when its connection dies is closed, never pooled.
///
/// Thread confinement: owned by one event loop.
public final class PipePool {
    public let pipeSize: Int
    public let maxIdle: Int
    private var idle: [Pipe] = []
    public private(set) var created = 0
    public private(set) var closed = 0

    public init(pipeSize: Int = 1 << 20, maxIdle: Int = 64) {
        self.pipeSize = pipeSize
        self.maxIdle = maxIdle
    }

    deinit { for p in idle { close(p) } }

    public var idleCount: Int { idle.count }
    /// Pipes handed out and not yet returned or closed.
    public var outstanding: Int { created - closed - idle.count }

    public func take() throws(SystemError) -> Pipe {
        if let p = idle.popLast() { return p }
        var fds: [Int32] = [0, 0]
        _ = try Posix.check("pipe2", culvert_pipe2(&fds, CULVERT_O_NONBLOCK | CULVERT_O_CLOEXEC))
        // A bigger pipe means fewer splice calls per byte; the kernel may cap it, so ask
        // what we got. Failure leaves the default (64 KiB), which still works.
        _ = culvert_fcntl_int(fds[1], CULVERT_F_SETPIPE_SZ, Int32(pipeSize))
        let size = culvert_fcntl_int(fds[1], CULVERT_F_GETPIPE_SZ, 0)
        created += 1
        return Pipe(readFD: fds[0], writeFD: fds[1], capacity: size > 0 ? Int(size) : 65536)
    }

    /// Returns an empty pipe to the pool.
    public func give(_ pipe: Pipe) {
        if idle.count < maxIdle { idle.append(pipe) } else { close(pipe) }
    }

    /// Closes a pipe that may still hold bytes.
    public func discard(_ pipe: Pipe) { close(pipe) }

    private func close(_ p: Pipe) {
        Posix.close(p.readFD)
        Posix.close(p.writeFD)
        closed += 1
    }
}

/// Per-loop pool of fixed-size copy buffers for the buffered copier (TLS, zlib), with the
/// same rule as pipes: taken only while bytes are in flight.
///
/// Thread confinement: owned by one event loop.
public final class BufferPool {
    public let bufferSize: Int
    public let maxIdle: Int
    private var idle: [UnsafeMutableRawPointer] = []
    public private(set) var outstanding = 0

    public init(bufferSize: Int = 64 * 1024, maxIdle: Int = 64) {
        self.bufferSize = bufferSize
        self.maxIdle = maxIdle
    }

    deinit { for b in idle { b.deallocate() } }

    public var idleCount: Int { idle.count }

    public func take() -> UnsafeMutableRawPointer {
        outstanding += 1
        return idle.popLast() ?? .allocate(byteCount: bufferSize, alignment: 16)
    }

    public func give(_ buffer: UnsafeMutableRawPointer) {
        outstanding -= 1
        if idle.count < maxIdle { idle.append(buffer) } else { buffer.deallocate() }
    }
}

/// The carriers one loop lends to its connections.
public final class LoopResources {
    public let pipes: PipePool
    public let buffers: BufferPool

    public init(pipes: PipePool = PipePool(), buffers: BufferPool = BufferPool()) {
        self.pipes = pipes
        self.buffers = buffers
    }
}

/// Replaces `buffer` by one of at least `needed` bytes (doubling `capacity`), keeping its
/// first `live` bytes: the growable queues of the mux and zlib layers.
func growBuffer(_ buffer: inout UnsafeMutableRawPointer, capacity: inout Int, keeping live: Int, toFit needed: Int) {
    var bigger = max(capacity, 1)
    while needed > bigger { bigger *= 2 }
    let grown = UnsafeMutableRawPointer.allocate(byteCount: bigger, alignment: 16)
    grown.copyMemory(from: buffer, byteCount: live)
    buffer.deallocate()
    buffer = grown
    capacity = bigger
}
