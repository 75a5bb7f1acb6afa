#if canImport(Glibc)
import Glibc
#endif
import CCulvert
import Reactor

/// What a process that holds a token (server, client, `pipe --via`) does so that the token
/// never lands on disk in a core dump. Like ssh-agent, it also turns off ptrace and
/// /proc/PID/{mem,environ,fd} for other processes of the same user; root keeps them.
public enum TokenHolder {
    /// Sets the core size limit to 0 (soft and hard, so that it cannot be raised again)
    /// and marks the process not dumpable, which also holds for a core pattern that pipes
    /// to a program (where the kernel ignores the size limit).
    public static func keepOutOfCoreDumps() throws(SystemError) {
        var none = rlimit(rlim_cur: 0, rlim_max: 0)
        guard setrlimit(Int32(RLIMIT_CORE.rawValue), &none) == 0 else { throw SystemError("setrlimit(RLIMIT_CORE)", errno: errno) }
        guard culvert_set_dumpable(0) == 0 else { throw SystemError("prctl(PR_SET_DUMPABLE)", errno: errno) }
    }
}
