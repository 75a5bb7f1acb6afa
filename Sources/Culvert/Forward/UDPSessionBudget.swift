#if canImport(Glibc)
import Glibc
#endif

/// How many sessions `forward udp` admits when `--max-sessions` is not given, and each
/// UDP service of `culvert client` when `--udp-max-sessions` is not.
///
/// Every session holds a descriptor until it idles out, and a new client address costs a
/// sender nothing (source addresses can be spoofed), so without a limit one flood takes
/// every descriptor. The default is half of the descriptors still free once the
/// listeners are bound, so the session limit, not EMFILE, is what a flood meets, with
/// room to spare for what the process opens later; and at most `ceiling`, which bounds
/// the kernel memory that sessions pin (a few KiB each) and is still more new clients
/// per idle timeout than a UDP service usually sees.
enum UDPSessionBudget {
    static let ceiling = 10_000

    /// The default limit when `free` descriptors are left; never 0, which means no limit.
    static func defaultLimit(freeDescriptors free: Int) -> Int {
        max(1, min(ceiling, free / 2))
    }

    /// The default limit of each of `services` limits drawn from the same descriptors (a
    /// tunnel client's UDP services): an equal share, so a flood on one service leaves the
    /// others their sessions.
    static func defaultLimit(freeDescriptors free: Int, sharedBy services: Int) -> Int {
        max(1, defaultLimit(freeDescriptors: free) / max(1, services))
    }

    /// Whether a session socket failed for want of descriptors or socket memory: another
    /// target would fail the same way, and a flood must meet a counter, not a log line
    /// per datagram.
    static func isOutOfResources(_ code: Int32) -> Bool {
        code == EMFILE || code == ENFILE || code == ENOBUFS || code == ENOMEM
    }

    /// The soft RLIMIT_NOFILE minus the descriptors open now (as counted in
    /// /proc/self/fd; without /proc, the whole soft limit).
    static func freeDescriptors() -> Int {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return Int.max }
        // RLIM_INFINITY is the largest rlim_t, so it clamps to Int.max.
        return max(0, Int(clamping: limit.rlim_cur) - openDescriptors())
    }

    private static func openDescriptors() -> Int {
        guard let dir = opendir("/proc/self/fd") else { return 0 }
        defer { closedir(dir) }
        var entries = 0
        while let entry = readdir(dir) {
            if entry.pointee.d_name.0 != CChar(UInt8(ascii: ".")) { entries += 1 }
        }
        // The directory stream's own descriptor is listed too.
        return max(0, entries - 1)
    }
}
