#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// Connects a TCP socket from async code on a loop, bounded by a timeout.
public enum AsyncConnect {
    private final class Waiter: EventHandler {
        var continuation: CheckedContinuation<Void, Error>?
        func handleEvents(_ events: UInt32, tag: UInt8) {
            continuation?.resume()
            continuation = nil
        }
    }

    /// Returns the connected, non-blocking socket; the caller owns it.
    public static func connect(to address: SocketAddress, timeout: Duration, on loop: EventLoop) async throws -> Int32 {
        let (fd, connected) = try Net.startConnect(address)
        if connected { return fd }
        let waiter = Waiter()
        let registration: Registration
        do {
            registration = try loop.register(fd: fd, interest: .write, handler: waiter)
        } catch {
            Posix.close(fd)
            throw error
        }
        var timedOut = false
        let timer = loop.schedule(after: timeout) {
            timedOut = true
            waiter.continuation?.resume()
            waiter.continuation = nil
        }
        defer {
            timer.cancel()
            loop.deregister(fd: fd, registration: registration)
        }
        while true {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, Error>) in
                waiter.continuation = c
            }
            if timedOut {
                Posix.close(fd)
                throw SystemError("connect", errno: ETIMEDOUT)
            }
            let err = Net.pendingError(fd)
            if err == 0 { return fd }
            if err != EINPROGRESS && err != EALREADY {
                Posix.close(fd)
                throw SystemError("connect", errno: err)
            }
        }
    }
}
