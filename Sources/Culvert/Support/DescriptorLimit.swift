#if canImport(Glibc)
import Glibc
#endif

/// Every connection costs one or two descriptors and every splice in flight two more, so
/// the soft limit that shells hand out (often 1,024) would cap a forwarder at a few
/// hundred connections. Like Go programs and haproxy, culvert raises its soft limit to
/// the hard one at start; nothing it uses needs descriptors below 1,024 (no select()).
enum DescriptorLimit {
    /// -> (old, new) soft limit if it was raised.
    static func raise() -> (UInt64, UInt64)? {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max else { return nil }
        let old = UInt64(limit.rlim_cur)
        // An unlimited hard limit is not a valid soft one for descriptors (the kernel caps
        // them at fs.nr_open): try the hard limit, then the usual nr_open default.
        for candidate in [limit.rlim_max, 1 << 20, 1 << 16] where candidate > limit.rlim_cur && candidate <= limit.rlim_max {
            var raised = limit
            raised.rlim_cur = candidate
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { return (old, UInt64(candidate)) }
        }
        return nil
    }
}
