#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// Datagrams with their peer address, carried over a byte stream (a tunnel data channel)
/// as frames: u32 length of what follows, u8 family (4 or 6), the address (4 or 16
/// bytes), u16 port, payload. Boundaries are kept and payloads up to 65,535 bytes pass.
///
/// When the stream cannot keep up, datagrams beyond `maxQueued` bytes are dropped and
/// counted, as a network would: a slow tunnel never makes memory grow without bound.
///
/// Thread confinement: driven on one loop.
public final class DatagramChannel: EventHandler {
    private let loop: EventLoop
    private let stream: Duplex
    private var registrations: [(Int32, Registration)] = []
    private var input: [UInt8] = []
    private var inputStart = 0
    private var output: [UInt8] = []
    private var outputOffset = 0
    private let maxQueued: Int
    private let onDatagram: (SocketAddress, UnsafeRawBufferPointer) -> Void
    private let onClose: (ChannelError?) -> Void
    public private(set) var isClosed = false
    public private(set) var dropped = 0
    public static let maxPayload = 65535

    public init(loop: EventLoop, stream: Duplex, maxQueued: Int = 4 << 20,
                onDatagram: @escaping (SocketAddress, UnsafeRawBufferPointer) -> Void,
                onClose: @escaping (ChannelError?) -> Void) {
        self.loop = loop
        self.stream = stream
        self.maxQueued = maxQueued
        self.onDatagram = onDatagram
        self.onClose = onClose
    }

    public func start() throws(SystemError) {
        loop.assertInLoop()
        registrations.append((stream.fd, try loop.register(fd: stream.fd, interest: .readWrite, handler: self)))
        readFrames()
    }

    public func handleEvents(_ events: UInt32, tag: UInt8) {
        stream.readReady = true
        stream.writeReady = true
        flush()
        readFrames()
    }

    // MARK: sending

    /// Queues one datagram for the peer; false when it was dropped (queue full or closed).
    @discardableResult
    public func send(_ payload: UnsafeRawBufferPointer, peer: SocketAddress) -> Bool {
        guard !isClosed, payload.count <= Self.maxPayload else { return false }
        if output.count - outputOffset > maxQueued {
            dropped += 1
            return false
        }
        var header: [UInt8] = []
        switch peer {
        case .v4(var a):
            header = [4] + withUnsafeBytes(of: &a.sin_addr) { Array($0) }
        case .v6(var a):
            header = [6] + withUnsafeBytes(of: &a.sin6_addr) { Array($0) }
        }
        header += [UInt8(peer.port >> 8), UInt8(peer.port & 0xff)]
        let length = UInt32(header.count + payload.count)
        output += [UInt8(length >> 24), UInt8(length >> 16 & 0xff), UInt8(length >> 8 & 0xff), UInt8(length & 0xff)]
        output += header
        output += payload
        flush()
        return true
    }

    private func flush() {
        while outputOffset < output.count && !isClosed {
            let r = output.withUnsafeBytes { stream.write(from: $0.baseAddress! + outputOffset, count: output.count - outputOffset) }
            switch r {
            case .bytes(let n): outputOffset += n
            case .wouldBlock: break
            case .eof: return close(.eof)
            case .failed(let e): return close(.io(e))
            }
            if case .wouldBlock = r { break }
        }
        if outputOffset == output.count {
            output.removeAll(keepingCapacity: output.capacity <= 1 << 20)
            outputOffset = 0
        } else if outputOffset > 1 << 20 {
            output.removeFirst(outputOffset)
            outputOffset = 0
        }
    }

    // MARK: receiving

    private func readFrames() {
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while !isClosed {
            let r = chunk.withUnsafeMutableBytes { stream.read(into: $0.baseAddress!, count: $0.count) }
            switch r {
            case .bytes(let n):
                input += chunk[0..<n]
                deliverFrames()
            case .wouldBlock:
                return
            case .eof:
                return close(nil)
            case .failed(let e):
                return close(.io(e))
            }
        }
    }

    private func deliverFrames() {
        while !isClosed && input.count - inputStart >= 4 {
            let b = inputStart
            let length = Int(input[b]) << 24 | Int(input[b + 1]) << 16 | Int(input[b + 2]) << 8 | Int(input[b + 3])
            guard length >= 7 && length <= Self.maxPayload + 19 else {
                return close(.protocolViolation("datagram frame of \(length) bytes"))
            }
            guard input.count - b - 4 >= length else { break }
            let frame = b + 4
            let family = input[frame]
            let addrLen = family == 4 ? 4 : family == 6 ? 16 : 0
            guard addrLen > 0, length >= 1 + addrLen + 2 else {
                return close(.protocolViolation("datagram frame with address family \(family)"))
            }
            let port = UInt16(input[frame + 1 + addrLen]) << 8 | UInt16(input[frame + 2 + addrLen])
            let peer: SocketAddress
            if family == 4 {
                var a = sockaddr_in()
                a.sin_family = sa_family_t(AF_INET)
                a.sin_port = port.bigEndian
                withUnsafeMutableBytes(of: &a.sin_addr) { $0.copyBytes(from: input[(frame + 1)..<(frame + 5)]) }
                peer = .v4(a)
            } else {
                var a = sockaddr_in6()
                a.sin6_family = sa_family_t(AF_INET6)
                a.sin6_port = port.bigEndian
                withUnsafeMutableBytes(of: &a.sin6_addr) { $0.copyBytes(from: input[(frame + 1)..<(frame + 17)]) }
                peer = .v6(a)
            }
            let payloadStart = frame + 3 + addrLen
            input.withUnsafeBytes { raw in
                onDatagram(peer, UnsafeRawBufferPointer(rebasing: raw[payloadStart..<(frame + length)]))
            }
            inputStart = frame + length
        }
        if inputStart == input.count {
            input.removeAll(keepingCapacity: true)
            inputStart = 0
        } else if inputStart > 256 * 1024 {
            input.removeFirst(inputStart)
            inputStart = 0
        }
    }

    // MARK: closing

    public func close(_ error: ChannelError? = nil) {
        loop.assertInLoop()
        guard !isClosed else { return }
        isClosed = true
        for (fd, r) in registrations { loop.deregister(fd: fd, registration: r) }
        registrations.removeAll()
        stream.close(reset: error != nil)
        onClose(error)
    }
}
