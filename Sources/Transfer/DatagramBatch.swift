#if canImport(Glibc)
import Glibc
#endif
import CCulvert
import Reactor

/// Slots and buffers for batched UDP I/O (recvmmsg/sendmmsg), allocated once per loop
/// so no datagram allocates on the hot path. Each slot holds one datagram of up to
/// `slotSize` bytes and its peer address.
///
/// Thread confinement: owned by one event loop; a batch is filled and sent out again
/// before the loop handles the next event.
public final class DatagramBatch {
    public let capacity: Int
    public let slotSize: Int
    private let slots: UnsafeMutablePointer<culvert_dgram>
    private let storage: UnsafeMutableRawPointer

    public init(capacity: Int = 32, slotSize: Int = 65536) {
        precondition(capacity > 0 && capacity <= 64)
        self.capacity = capacity
        self.slotSize = slotSize
        storage = .allocate(byteCount: capacity * slotSize, alignment: 64)
        slots = .allocate(capacity: capacity)
        for i in 0..<capacity {
            slots[i] = culvert_dgram()
            slots[i].buf = storage + i * slotSize
            slots[i].cap = slotSize
        }
    }

    deinit {
        slots.deallocate()
        storage.deallocate()
    }

    /// Receives up to `capacity` datagrams; 0 when none is waiting.
    public func receive(from fd: Int32) throws(SystemError) -> Int {
        let n = culvert_recv_batch(fd, slots, Int32(capacity))
        if n >= 0 { return Int(n) }
        if errno == EAGAIN { return 0 }
        throw SystemError("recvmmsg", errno: errno)
    }

    /// Sends slots `range` to `fd`, all to one destination: the first slot's address, or
    /// the connected peer when it has none (`setAddress(_, nil)`). Equal-sized datagrams
    /// go out segmented (UDP GSO). Returns how many went out (fewer when the socket is full).
    public func send(to fd: Int32, _ range: Range<Int>) throws(SystemError) -> Int {
        var sent = 0
        while sent < range.count {
            let n = culvert_send_segmented(fd, slots + range.lowerBound + sent, Int32(range.count - sent))
            if n < 0 {
                if errno == EAGAIN { return sent }
                throw SystemError("sendmmsg", errno: errno)
            }
            sent += Int(n)
        }
        return sent
    }

    public func length(_ i: Int) -> Int { slots[i].len }

    public func isTruncated(_ i: Int) -> Bool { slots[i].truncated != 0 }

    public func payload(_ i: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: slots[i].buf, count: slots[i].len)
    }

    /// The source address of a received datagram.
    public func address(_ i: Int) -> SocketAddress? {
        withUnsafePointer(to: &slots[i].addr) { SocketAddress(storage: UnsafeRawPointer($0)) }
    }

    /// Sets where slot `i` goes on the next `send` (nil: the connected peer).
    public func setAddress(_ i: Int, _ address: SocketAddress?) {
        guard let address else {
            slots[i].addrlen = 0
            return
        }
        let len: socklen_t = (try? address.withSockAddr { (sa, len) throws(SystemError) -> socklen_t in
            withUnsafeMutablePointer(to: &slots[i].addr) {
                UnsafeMutableRawPointer($0).copyMemory(from: sa, byteCount: Int(len))
            }
            return len
        }) ?? 0
        slots[i].addrlen = len
    }
}

extension Net {
    /// A UDP socket bound to `address` (SO_REUSEPORT so each loop can own one; the
    /// kernel keeps a client's datagrams on the same socket) with large buffers.
    public static func udpListen(_ address: SocketAddress, reusePort: Bool, bufferSize: Int) throws(SystemError) -> Int32 {
        let fd = try socket(family: address.family, type: Int32(SOCK_DGRAM.rawValue))
        do {
            try setOption(fd, SOL_SOCKET, SO_REUSEADDR, 1)
            if reusePort { try setOption(fd, SOL_SOCKET, SO_REUSEPORT, 1) }
            if address.family == AF_INET6 { try setOption(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, 1) }
            setBuffers(fd, bufferSize)
            _ = try address.withSockAddr { (sa, len) throws(SystemError) in
                try Posix.check("bind", Glibc.bind(fd, sa, len))
            }
            return fd
        } catch {
            Posix.close(fd)
            throw error
        }
    }

    /// A UDP socket connected to `target`, so only its replies arrive and an ICMP
    /// unreachable shows as ECONNREFUSED on this socket alone.
    public static func udpConnect(_ target: SocketAddress, bufferSize: Int) throws(SystemError) -> Int32 {
        let fd = try socket(family: target.family, type: Int32(SOCK_DGRAM.rawValue))
        setBuffers(fd, bufferSize)
        do {
            _ = try target.withSockAddr { (sa, len) throws(SystemError) in
                try Posix.check("connect", Glibc.connect(fd, sa, len))
            }
        } catch {
            Posix.close(fd)
            throw error
        }
        return fd
    }

    /// Asks for `size`-byte send and receive buffers; as root the FORCE variants pass
    /// the sysctl caps, otherwise the kernel clamps. Failure keeps the defaults.
    static func setBuffers(_ fd: Int32, _ size: Int) {
        guard size > 0 else { return }
        let v = Int32(clamping: size)
        if (try? setOption(fd, SOL_SOCKET, SO_RCVBUFFORCE, v)) == nil { try? setOption(fd, SOL_SOCKET, SO_RCVBUF, v) }
        if (try? setOption(fd, SOL_SOCKET, SO_SNDBUFFORCE, v)) == nil { try? setOption(fd, SOL_SOCKET, SO_SNDBUF, v) }
    }
}
