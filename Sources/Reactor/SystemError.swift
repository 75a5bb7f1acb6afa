#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: the call's name and the errno it left.
public struct SystemError: Error, Equatable, CustomStringConvertible, Sendable {
    public let call: String
    public let errno: Int32

    public init(_ call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }

    /// The symbolic errno name (`ECONNREFUSED`), for logs that scripts grep.
    public var errnoName: String { SystemError.names[errno] ?? "errno \(errno)" }

    public var description: String {
        "\(call): \(String(cString: strerror(errno))) (\(errnoName))"
    }

    public var isWouldBlock: Bool { errno == EAGAIN || errno == EWOULDBLOCK }

    private static let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", EINTR: "EINTR", EIO: "EIO", EBADF: "EBADF",
        EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES", EFAULT: "EFAULT",
        EBUSY: "EBUSY", EEXIST: "EEXIST", EINVAL: "EINVAL", ENFILE: "ENFILE",
        EMFILE: "EMFILE", ENOSPC: "ENOSPC", EPIPE: "EPIPE", ENOSYS: "ENOSYS",
        ENOTSOCK: "ENOTSOCK", EADDRINUSE: "EADDRINUSE", EADDRNOTAVAIL: "EADDRNOTAVAIL",
        ENETDOWN: "ENETDOWN", ENETUNREACH: "ENETUNREACH", ECONNABORTED: "ECONNABORTED",
        ECONNRESET: "ECONNRESET", ENOBUFS: "ENOBUFS", EISCONN: "EISCONN",
        ENOTCONN: "ENOTCONN", ETIMEDOUT: "ETIMEDOUT", ECONNREFUSED: "ECONNREFUSED",
        EHOSTUNREACH: "EHOSTUNREACH", EALREADY: "EALREADY", EINPROGRESS: "EINPROGRESS",
        EAFNOSUPPORT: "EAFNOSUPPORT", EPROTO: "EPROTO", EMSGSIZE: "EMSGSIZE",
        EHOSTDOWN: "EHOSTDOWN",
    ]
}

/// Thin wrappers over the system calls the reactor uses: a failure becomes a `SystemError`
/// carrying the call's name. `check` does not retry on EINTR: the calls it wraps (socket,
/// pipe2, epoll_ctl, ...) never wait; the ones that can be interrupted (epoll_wait, accept,
/// reads and writes) handle EINTR where they are made.
public enum Posix {
    @inline(__always)
    public static func check(_ call: String, _ result: Int32) throws(SystemError) -> Int32 {
        if result < 0 { throw SystemError(call, errno: Glibc.errno) }
        return result
    }

    public static func close(_ fd: Int32) {
        // close(2) must not be retried on EINTR on Linux: the fd is released either way.
        _ = Glibc.close(fd)
    }
}
