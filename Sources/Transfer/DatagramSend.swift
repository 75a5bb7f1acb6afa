#if canImport(Glibc)
import Glibc
#endif
import Reactor

extension Net {
    /// Sends one datagram made of `header` then `payload` (gathered, not copied) to
    /// `address`, or to the connected peer when it is nil. False when the socket's buffer
    /// is full (the datagram is not sent).
    public static func sendDatagram(_ fd: Int32, header: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer,
                                    to address: SocketAddress?) throws(SystemError) -> Bool {
        var iov = [
            iovec(iov_base: UnsafeMutableRawPointer(mutating: header.baseAddress), iov_len: header.count),
            iovec(iov_base: UnsafeMutableRawPointer(mutating: payload.baseAddress), iov_len: payload.count),
        ]
        let sent: Int = iov.withUnsafeMutableBufferPointer { vectors in
            var message = msghdr()
            message.msg_iov = vectors.baseAddress
            message.msg_iovlen = vectors.count
            guard let address else { return Self.retrying { sendmsg(fd, &message, Int32(MSG_DONTWAIT)) } }
            return (try? address.withSockAddr { (sa, len) throws(SystemError) -> Int in
                message.msg_name = UnsafeMutableRawPointer(mutating: sa)
                message.msg_namelen = len
                return Self.retrying { sendmsg(fd, &message, Int32(MSG_DONTWAIT)) }
            }) ?? -1
        }
        if sent >= 0 { return true }
        if errno == EAGAIN { return false }
        throw SystemError("sendmsg", errno: errno)
    }

    private static func retrying(_ call: () -> Int) -> Int {
        while true {
            let n = call()
            if n >= 0 || errno != EINTR { return n }
        }
    }
}
