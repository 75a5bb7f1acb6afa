#if canImport(Glibc)
import Glibc
#endif
import Reactor

/// Tells systemd how a `Type=notify` service is doing, as sd_notify(3) does without
/// libsystemd: one datagram per message to the AF_UNIX socket named in `NOTIFY_SOCKET`
/// (a leading '@' names an abstract socket). Without `NOTIFY_SOCKET` every call does
/// nothing. Sends never block (MSG_DONTWAIT): systemd reads its socket at once, and a
/// lost notification is better than a stalled loop.
public struct SystemdNotifier: Sendable {
    /// The notification socket's address; nil when the process is not run by systemd.
    private let address: [UInt8]?

    /// The notifier for this process's environment.
    public static let current = SystemdNotifier(socket: getenv("NOTIFY_SOCKET").map { String(cString: $0) })

    init(socket path: String?) {
        guard let path, !path.isEmpty, path.utf8.count < MemoryLayout.size(ofValue: sockaddr_un().sun_path) else {
            address = nil
            return
        }
        var bytes = Array(path.utf8)
        if bytes[0] == UInt8(ascii: "@") { bytes[0] = 0 }
        address = bytes
    }

    public var isEnabled: Bool { address != nil }

    /// Start-up finished: the ready lines are out.
    public func ready() { send("READY=1") }

    /// The drain began.
    public func stopping() { send("STOPPING=1") }

    /// A reload begins; `ready()` ends it. For the reload work (SIGHUP).
    public func reloading() {
        send("RELOADING=1\nMONOTONIC_USEC=\(MonotonicClock.now() / 1000)")
    }

    /// The service is alive (`WatchdogSec=`).
    public func watchdog() { send("WATCHDOG=1") }

    /// How often to send `watchdog()`: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
    /// advises; nil when systemd asks for none or asks another process (`WATCHDOG_PID`).
    public static func watchdogInterval() -> Duration? {
        guard let usec = getenv("WATCHDOG_USEC").flatMap({ UInt64(String(cString: $0)) }), usec > 0 else { return nil }
        if let pid = getenv("WATCHDOG_PID").flatMap({ Int32(String(cString: $0)) }), pid != getpid() { return nil }
        return .microseconds(Int64(usec / 2))
    }

    /// Sends `message` as one datagram; failures are ignored, as sd_notify's callers do.
    func send(_ message: String) {
        guard let address else { return }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var sun = sockaddr_un()
        sun.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &sun.sun_path) { path in
            for (i, b) in address.enumerated() { path[i] = b }
        }
        // An abstract name is exactly its bytes; a path name ends at its NUL.
        let length = MemoryLayout<sa_family_t>.size + address.count + (address[0] == 0 ? 0 : 1)
        let bytes = Array(message.utf8)
        _ = withUnsafePointer(to: &sun) { sunPointer in
            sunPointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                bytes.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL), sa, socklen_t(length)) }
            }
        }
    }
}
