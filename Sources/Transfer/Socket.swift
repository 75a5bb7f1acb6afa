#if canImport(Glibc)
import Glibc
#endif
import CCulvert
import Reactor

/// Outcome of one non-blocking read or write.
public enum IOResult: Equatable {
    case bytes(Int)
    case wouldBlock
    case eof
    case failed(SystemError)
}

/// Socket system calls, non-blocking and close-on-exec throughout; each failure is a
/// `SystemError` naming the call.
public enum Net {
    public static func socket(family: Int32, type: Int32) throws(SystemError) -> Int32 {
        try Posix.check("socket", Glibc.socket(family, type | CULVERT_SOCK_NONBLOCK | CULVERT_SOCK_CLOEXEC, 0))
    }

    public static func setOption(_ fd: Int32, _ level: Int32, _ name: Int32, _ value: Int32) throws(SystemError) {
        var v = value
        _ = try Posix.check("setsockopt", setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)))
    }

    /// A listening TCP socket bound to `address`. `reusePort` lets every loop own a
    /// listener on the same port so accepted connections spread without locks.
    public static func listen(_ address: SocketAddress, reusePort: Bool, backlog: Int32 = 4096) throws(SystemError) -> Int32 {
        let fd = try socket(family: address.family, type: Int32(SOCK_STREAM.rawValue))
        do {
            try setOption(fd, SOL_SOCKET, SO_REUSEADDR, 1)
            if reusePort { try setOption(fd, SOL_SOCKET, SO_REUSEPORT, 1) }
            if address.family == AF_INET6 { try setOption(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, 1) }
            // Accepted sockets inherit it: one setsockopt per listener, not per connection.
            try setOption(fd, Int32(IPPROTO_TCP), TCP_NODELAY, 1)
            _ = try address.withSockAddr { (sa, len) throws(SystemError) in
                try Posix.check("bind", Glibc.bind(fd, sa, len))
            }
            _ = try Posix.check("listen", Glibc.listen(fd, backlog))
            return fd
        } catch {
            Posix.close(fd)
            throw error
        }
    }

    /// Accepts one connection; nil when none is pending.
    public static func accept(_ fd: Int32) throws(SystemError) -> (Int32, SocketAddress?)? {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        while true {
            let c = withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    culvert_accept4(fd, $0, &len, CULVERT_SOCK_NONBLOCK | CULVERT_SOCK_CLOEXEC)
                }
            }
            if c >= 0 {
                let peer = withUnsafeBytes(of: &storage) { SocketAddress(storage: $0.baseAddress!) }
                return (c, peer)
            }
            switch errno {
            case EINTR, ECONNABORTED: continue
            case EAGAIN: return nil
            default: throw SystemError("accept4", errno: errno)
            }
        }
    }

    /// Starts a non-blocking connect. Returns true when already connected (possible on
    /// loopback), false when in progress; completion shows as writability + SO_ERROR.
    public static func startConnect(_ address: SocketAddress) throws(SystemError) -> (fd: Int32, connected: Bool) {
        let fd = try socket(family: address.family, type: Int32(SOCK_STREAM.rawValue))
        let rc = try? address.withSockAddr { (sa, len) throws(SystemError) in Glibc.connect(fd, sa, len) }
        if rc == 0 { return (fd, true) }
        let e = errno
        if e == EINPROGRESS || e == EINTR { return (fd, false) }
        Posix.close(fd)
        throw SystemError("connect", errno: e)
    }

    /// The pending error of a socket (the outcome of a non-blocking connect).
    public static func pendingError(_ fd: Int32) -> Int32 {
        var err: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 { return errno }
        return err
    }

    public static func localAddress(_ fd: Int32) throws(SystemError) -> SocketAddress {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        _ = try Posix.check("getsockname", rc)
        guard let a = withUnsafeBytes(of: &storage, { SocketAddress(storage: $0.baseAddress!) }) else {
            throw SystemError("getsockname", errno: EAFNOSUPPORT)
        }
        return a
    }

    /// The address a connected socket's peer has.
    public static func peerAddress(_ fd: Int32) throws(SystemError) -> SocketAddress {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) }
        }
        _ = try Posix.check("getpeername", rc)
        guard let a = withUnsafeBytes(of: &storage, { SocketAddress(storage: $0.baseAddress!) }) else {
            throw SystemError("getpeername", errno: EAFNOSUPPORT)
        }
        return a
    }

    @inline(__always)
    public static func read(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int) -> IOResult {
        while true {
            let n = Glibc.read(fd, buf, count)
            if n > 0 { return .bytes(n) }
            if n == 0 { return .eof }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN { return .wouldBlock }
            return .failed(SystemError("read", errno: e))
        }
    }

    /// - Parameter more: more bytes follow at once (MSG_MORE): the kernel may hold these
    ///   back to send them in one segment with the next write.
    @inline(__always)
    public static func write(_ fd: Int32, _ buf: UnsafeRawPointer, _ count: Int, more: Bool = false) -> IOResult {
        let flags = more ? Int32(MSG_NOSIGNAL) | Int32(MSG_MORE) : Int32(MSG_NOSIGNAL)
        while true {
            let n = Glibc.send(fd, buf, count, flags)
            if n >= 0 { return .bytes(n) }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN { return .wouldBlock }
            return .failed(SystemError("send", errno: e))
        }
    }

    /// Sends a header and a body with one system call (sendmsg, no copy into one buffer).
    @inline(__always)
    public static func write(_ fd: Int32, header: UnsafeRawPointer, _ headerCount: Int,
                             body: UnsafeRawPointer, _ bodyCount: Int) -> IOResult {
        var iov = (iovec(iov_base: UnsafeMutableRawPointer(mutating: header), iov_len: headerCount),
                   iovec(iov_base: UnsafeMutableRawPointer(mutating: body), iov_len: bodyCount))
        return withUnsafeMutablePointer(to: &iov) { p in
            p.withMemoryRebound(to: iovec.self, capacity: 2) { v in
                var msg = msghdr()
                msg.msg_iov = v
                msg.msg_iovlen = 2
                while true {
                    let n = Glibc.sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
                    if n >= 0 { return .bytes(n) }
                    let e = errno
                    if e == EINTR { continue }
                    if e == EAGAIN { return .wouldBlock }
                    return .failed(SystemError("sendmsg", errno: e))
                }
            }
        }
    }

    /// Moves up to `count` bytes between a socket and a pipe without copying to user space.
    /// 0 means EOF on the source.
    @inline(__always)
    public static func splice(from source: Int32, to destination: Int32, _ count: Int, more: Bool = false) -> IOResult {
        var flags = CULVERT_SPLICE_F_MOVE | CULVERT_SPLICE_F_NONBLOCK
        if more { flags |= CULVERT_SPLICE_F_MORE }
        while true {
            let n = culvert_splice(source, destination, count, flags)
            if n > 0 { return .bytes(n) }
            if n == 0 { return .eof }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN { return .wouldBlock }
            return .failed(SystemError("splice", errno: e))
        }
    }

    public static func shutdownWrite(_ fd: Int32) -> SystemError? {
        Glibc.shutdown(fd, Int32(SHUT_WR)) < 0 ? SystemError("shutdown", errno: errno) : nil
    }

    /// Closes so that the peer sees a reset instead of an orderly FIN: how an abort on
    /// one side is passed on to the other.
    public static func closeWithReset(_ fd: Int32) {
        var l = linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
        Posix.close(fd)
    }
}
