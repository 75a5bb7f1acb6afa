#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// One direction of a copy-bidirectional relay: bytes from `source` to `destination`.
///
/// States (after tokio's copy_bidirectional):
/// - `running`: reading from the source whenever the carrier has room, writing out what
///   it holds whenever the destination can take it;
/// - `flushing`: the source hit EOF; writing out what is still in flight, then
///   shutdown(SHUT_WR) on the destination (half-close passes through);
/// - `done`: the destination got its FIN; nothing more moves this way.
///
/// Bytes in flight sit in a carrier borrowed from the loop: a pipe when both ends are
/// plain sockets and the direction carries bulk data (splice, no user-space copy), a
/// buffer otherwise. The carrier is given back as soon as it is empty, so an idle
/// connection holds neither.
struct CopyDirection {
    enum State { case running, flushing, done }

    enum Carrier {
        case none
        case pipe(Pipe)
        case buffer(UnsafeMutableRawPointer, size: Int)
    }

    /// What one pump call ended on.
    enum Step: Equatable {
        /// Waiting for readiness of one of the ends.
        case waiting
        /// Budget used up while still able to move bytes; pump again soon.
        case yielded
        /// Reached `done` in this call.
        case finished
        case failed(SystemError)
    }

    private(set) var state: State = .running
    private var carrier: Carrier = .none
    /// Bytes in the carrier not yet written to the destination.
    private var pending = 0
    /// Where the pending bytes start in a buffer carrier.
    private var offset = 0
    /// Bytes delivered to the destination.
    private(set) var bytes: UInt64 = 0

    let useSplice: Bool
    /// Whether this direction has shown bulk traffic (a read filled a whole buffer).
    /// Until then even a splicing direction copies through a buffer: for the small
    /// exchanges that make up most short connections, recv/send costs the kernel less
    /// than moving pages through a pipe, and haproxy does the same.
    private var bulk = false

    init(useSplice: Bool) { self.useSplice = useSplice }

    var isDone: Bool { state == .done }

    /// Moves bytes until both ends would block, the budget runs out, or the direction ends.
    /// - Parameters:
    ///   - closingAfter: the relay closes both ends as soon as this direction is done
    ///     (the other one already is), so the FIN that close sends replaces shutdown.
    ///   - shortReadDrains: the source is a plain socket whose hang-up, if any, has not
    ///     been reported yet, so a read that returns less than asked has emptied it and
    ///     the next bytes or FIN bring a new edge: no read is spent to hear EAGAIN.
    mutating func pump(from source: Duplex, to destination: Duplex, resources: LoopResources, budget: Int,
                       closingAfter: Bool = false, shortReadDrains: Bool = false) -> Step {
        if state == .done { return .waiting }
        var moved = 0
        // Set when a splice into the pipe said EAGAIN while the pipe held bytes: the pipe
        // may be full (its slots are pages, not bytes), so read again only after a write.
        var carrierFull = false
        while true {
            if pending > 0 && destination.writeReady {
                switch writeOut(to: destination) {
                case .bytes(let n):
                    pending -= n
                    offset += n
                    bytes += UInt64(n)
                    moved += n
                    carrierFull = false
                    if pending == 0 { releaseCarrier(resources) }
                    if moved >= budget { return .yielded }
                    continue
                case .wouldBlock:
                    destination.writeReady = false
                case .eof:
                    return .failed(SystemError("write", errno: EPIPE))
                case .failed(let e):
                    return .failed(e)
                }
            }
            if pending == 0 && state == .flushing {
                state = .done
                if closingAfter && destination.closesDescriptors { return .finished }
                if let e = destination.shutdownWrite(), e.errno != ENOTCONN /* the peer is already gone */ {
                    return .failed(e)
                }
                return .finished
            }
            if state == .running && pending == 0 && source.readReady, let lent = source.borrowReadable() {
                // The source holds the bytes already (in memory or a pipe): write them from there.
                switch lent {
                case .bytes, .pipe:
                    guard destination.writeReady else { return .waiting }
                    switch Self.write(lent, to: destination) {
                    case .bytes(let n):
                        source.consumeBorrowed(n)
                        bytes += UInt64(n)
                        moved += n
                        if moved >= budget { return .yielded }
                    case .wouldBlock:
                        // For a pipe too: it holds bytes, so the destination is full.
                        destination.writeReady = false
                        return .waiting
                    case .eof:
                        return .failed(SystemError("write", errno: EPIPE))
                    case .failed(let e):
                        return .failed(e)
                    }
                case .wouldBlock:
                    source.readReady = false
                case .eof:
                    state = .flushing
                case .failed(let e):
                    return .failed(e)
                }
                continue
            }
            if state == .running && source.readReady && !carrierFull && hasRoom {
                if case .none = carrier {
                    do { try takeCarrier(resources) } catch { return .failed(error) }
                }
                switch readIn(from: source, shortReadDrains: shortReadDrains) {
                case .bytes(let n):
                    pending += n
                    continue
                case .eof:
                    state = .flushing
                    if pending == 0 { releaseCarrier(resources) }
                    continue
                case .wouldBlock:
                    if pending == 0 {
                        source.readReady = false
                        releaseCarrier(resources)
                    } else {
                        carrierFull = true
                    }
                    continue
                case .failed(let e):
                    return .failed(e)
                }
            }
            return .waiting
        }
    }

    /// Gives the carrier back; a pipe still holding bytes is closed, never pooled.
    mutating func releaseCarrier(_ resources: LoopResources) {
        switch carrier {
        case .none: break
        case .pipe(let p):
            if pending == 0 { resources.pipes.give(p) } else { resources.pipes.discard(p) }
        case .buffer(let b, _):
            resources.buffers.give(b)
        }
        carrier = .none
        pending = 0
        offset = 0
    }

    /// Marks the direction finished without flushing (the relay is being torn down).
    mutating func abandon(_ resources: LoopResources) {
        releaseCarrier(resources)
        state = .done
    }

    private var hasRoom: Bool {
        switch carrier {
        case .none: return true
        case .pipe(let p): return pending < p.capacity
        case .buffer: return pending == 0
        }
    }

    private mutating func takeCarrier(_ resources: LoopResources) throws(SystemError) {
        if useSplice && bulk {
            carrier = .pipe(try resources.pipes.take())
        } else {
            carrier = .buffer(resources.buffers.take(), size: resources.buffers.bufferSize)
            offset = 0
        }
    }

    private mutating func readIn(from source: Duplex, shortReadDrains: Bool) -> IOResult {
        switch carrier {
        case .none:
            return .wouldBlock
        case .pipe(let p):
            return Net.splice(from: source.fd, to: p.writeFD, p.capacity - pending)
        case .buffer(let b, let size):
            offset = 0
            let r = source.read(into: b, count: size)
            if case .bytes(let n) = r {
                if n == size { bulk = true } else if shortReadDrains { source.readReady = false }
            }
            return r
        }
    }

    /// Writes what a source lends: from its memory, or spliced from its pipe.
    private static func write(_ lent: Borrowed, to destination: Duplex) -> IOResult {
        switch lent {
        case .bytes(let region): return destination.write(from: region.baseAddress!, count: region.count)
        case .pipe(let fd, let count): return destination.write(fromPipe: fd, count: count)
        default: return .wouldBlock
        }
    }

    private func writeOut(to destination: Duplex) -> IOResult {
        switch carrier {
        case .none:
            return .wouldBlock
        case .pipe(let p):
            return destination.write(fromPipe: p.readFD, count: pending)
        case .buffer(let b, _):
            return destination.write(from: b + offset, count: pending)
        }
    }
}
