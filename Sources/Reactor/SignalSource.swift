#if canImport(Glibc)
import Glibc
#endif
import CCulvert

/// Delivers SIGINT, SIGTERM and SIGHUP to a handler on the main loop through a signalfd.
///
/// Create it on the main thread before other threads start: the signals are blocked in
/// the creating thread and every thread the reactor spawns, so the signalfd is the only
/// place they arrive.
public final class SignalSource: EventHandler {
    public static let handledSignals: [Int32] = [SIGINT, SIGTERM, SIGHUP]

    private let fd: Int32
    private let loop: EventLoop
    private var registration: Registration?
    private let handler: (Int32) -> Void

    public init(loop: EventLoop, handler: @escaping (Int32) -> Void) throws(SystemError) {
        culvert_ignore_sigpipe()
        let fd = SignalSource.handledSignals.withUnsafeBufferPointer {
            culvert_signalfd($0.baseAddress, Int32($0.count))
        }
        if fd < 0 { throw SystemError("signalfd", errno: errno) }
        self.fd = fd
        self.loop = loop
        self.handler = handler
        registration = try loop.register(fd: fd, interest: .read, handler: self)
    }

    public func handleEvents(_ events: UInt32, tag: UInt8) {
        while true {
            let signo = culvert_signalfd_read(fd)
            if signo < 0 { return }
            handler(signo)
        }
    }

    public func close() {
        guard let reg = registration else { return }
        loop.deregister(fd: fd, registration: reg)
        registration = nil
        Posix.close(fd)
    }
}
