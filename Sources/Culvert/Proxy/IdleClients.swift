/// The clients of one loop that a drain ends at once instead of waiting for them: HTTP
/// clients kept alive between two requests, and UDP associations (which, like the
/// sessions of `forward udp`, have no end of their own to wait for). A client enters
/// while it is idle and leaves when it is busy again; the drain runs each one's `end`.
///
/// Thread confinement: every method runs on the loop of the worker that owns it.
final class IdleClients {
    private var ends: [ObjectIdentifier: () -> Void] = [:]
    /// Set once the loop's drain began: no client may become idle again.
    private(set) var draining = false

    /// Marks `client` idle; `end` closes it. At once when the drain already began.
    func enter(_ client: AnyObject, end: @escaping () -> Void) {
        if draining { return end() }
        ends[ObjectIdentifier(client)] = end
    }

    func leave(_ client: AnyObject) {
        ends[ObjectIdentifier(client)] = nil
    }

    /// Ends every idle client, and any that becomes idle later.
    func drain() {
        draining = true
        let all = ends
        ends = [:]
        for end in all.values { end() }
    }
}
