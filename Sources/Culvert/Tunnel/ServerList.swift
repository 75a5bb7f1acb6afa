/// The client's servers in order of preference, each with a backoff of its own: a
/// server that failed (could not be reached, or lost its session) is skipped until its
/// backoff ends, so the client moves to the next one at once; when every server is
/// backing off, the client waits for the one whose backoff ends first. A server's backoff
/// doubles with each failure in a row, from `initial` up to `max`, with jitter, and
/// starts again from `initial` once it served.
///
/// A value type without a clock: callers pass the loop's `now`, so the choice can be
/// tested on its own.
struct ServerList {
    /// One server and what its failures cost it.
    struct Server {
        let endpoint: ServerEndpoint
        /// Failures in a row since it last served.
        var failures = 0
        /// Loop time (nanoseconds) before which it is not tried; 0: at once.
        var retryAt: UInt64 = 0
    }

    private(set) var servers: [Server]
    let initial: Duration
    let max: Duration

    init(_ endpoints: [ServerEndpoint], initial: Duration, max: Duration) {
        precondition(!endpoints.isEmpty, "a client has at least one server")
        servers = endpoints.map { Server(endpoint: $0) }
        self.initial = initial
        self.max = max
    }

    var count: Int { servers.count }

    subscript(index: Int) -> Server { servers[index] }

    /// The server to try now: the first not backing off, else the one whose backoff ends
    /// first, with the time left until then.
    func next(now: UInt64) -> (index: Int, wait: Duration) {
        if let ready = servers.firstIndex(where: { $0.retryAt <= now }) { return (ready, .zero) }
        let soonest = servers.indices.min { servers[$0].retryAt < servers[$1].retryAt }!
        return (soonest, .nanoseconds(Int64(servers[soonest].retryAt - now)))
    }

    /// `index` could not be reached or lost its session: it backs off. `jitter` (0.5 to
    /// 1) spreads clients that lost the same server.
    mutating func failed(_ index: Int, now: UInt64, jitter: Double = .random(in: 0.5...1.0)) {
        servers[index].failures += 1
        let base = initial.nanoseconds << UInt64(min(servers[index].failures - 1, 20))
        let capped = min(base, max.nanoseconds)
        servers[index].retryAt = now + UInt64(Double(capped) * jitter)
    }

    /// `index` holds a session: its backoff starts again from the beginning.
    mutating func served(_ index: Int) {
        servers[index].failures = 0
        servers[index].retryAt = 0
    }
}
