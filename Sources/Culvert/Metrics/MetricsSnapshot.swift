/// What one service did, summed over the loops at one scrape: the values behind its
/// labelled series and its `/status` entry.
public struct ServiceSample: Sendable, Equatable {
    /// `tcp` or `udp`.
    public var kind: String
    /// The addresses it listens on (filled in by the command, which knows them).
    public var ports: [String] = []
    public var active = 0
    /// Connections (or UDP sessions) that ended or were refused, by result: a relay's
    /// close reason (`eof`, `reset`, `idle-timeout`, `drain-timeout`), `refused`, `connect-failed`.
    public var results: [String: UInt64] = [:]
    /// Client (visitor) to target.
    public var bytesUp: UInt64 = 0
    /// Target to client.
    public var bytesDown: UInt64 = 0
    public var datagramsUp: UInt64 = 0
    public var datagramsDown: UInt64 = 0
    /// Datagrams dropped, by reason (`session_limit`, `no_descriptor`, `socket_full`, `oversized`).
    public var dropped: [String: UInt64] = [:]

    public init(kind: String) {
        self.kind = kind
    }

    /// Connections that ended or were refused, every result together.
    public var total: UInt64 { results.values.reduce(0, +) }

    mutating func add(_ other: ServiceSample) {
        active += other.active
        results.merge(other.results, uniquingKeysWith: +)
        bytesUp += other.bytesUp
        bytesDown += other.bytesDown
        datagramsUp += other.datagramsUp
        datagramsDown += other.datagramsDown
        dropped.merge(other.dropped, uniquingKeysWith: +)
        for p in other.ports where !ports.contains(p) { ports.append(p) }
    }
}

/// A latency histogram with fixed bucket bounds, as Prometheus wants it: cheap to fill
/// (one comparison walk and two additions), summed over loops by adding counts.
public struct Histogram: Sendable, Equatable {
    /// Upper bounds in seconds: from a loopback connect (well under a millisecond) to a
    /// dial that runs into the default 5 s connect timeout.
    public static let bounds: [Double] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
    /// Observations per bucket, not cumulative; the last one is above every bound.
    public private(set) var counts = [UInt64](repeating: 0, count: Histogram.bounds.count + 1)
    public private(set) var sum: Double = 0
    public var count: UInt64 { counts.reduce(0, +) }

    public init() {}

    mutating func observe(nanoseconds: UInt64) {
        let seconds = Double(nanoseconds) / 1e9
        sum += seconds
        counts[Histogram.bounds.firstIndex { seconds <= $0 } ?? Histogram.bounds.count] += 1
    }

    mutating func add(_ other: Histogram) {
        for i in counts.indices { counts[i] += other.counts[i] }
        sum += other.sum
    }
}

/// Every counter of a command, gathered from its loops at one scrape and merged.
public struct MetricsSnapshot: Sendable, Equatable {
    /// By service name: the forwarder's listen address, the client's service name, the
    /// server's bound public addresses.
    public var services: [String: ServiceSample] = [:]
    /// Failed client authentications on a server, by reason.
    public var authFailures: [String: UInt64] = [:]
    /// Accept (or a visitor's arrival) until the target answered.
    public var connectDuration = Histogram()
    /// Tunnel sessions up now: clients connected (server), 0 or 1 (client).
    public var tunnelSessions = 0
    /// Times the client connected again after losing or failing to reach its server.
    public var tunnelReconnects: UInt64 = 0
    /// The server whose session holds the client's services now (`HOST:PORT` as given);
    /// nil on a server, or while no server serves.
    public var tunnelServer: String?

    public init() {}

    /// Adds `other`'s counters to these (one loop's share to the sum).
    public mutating func add(_ other: MetricsSnapshot) {
        for (name, sample) in other.services {
            services[name, default: ServiceSample(kind: sample.kind)].add(sample)
        }
        authFailures.merge(other.authFailures, uniquingKeysWith: +)
        connectDuration.add(other.connectDuration)
        tunnelSessions += other.tunnelSessions
        tunnelReconnects += other.tunnelReconnects
        tunnelServer = tunnelServer ?? other.tunnelServer
    }

    /// The sum of every loop's share.
    static func merged(_ parts: [MetricsSnapshot]) -> MetricsSnapshot {
        var all = MetricsSnapshot()
        for p in parts { all.add(p) }
        return all
    }
}

/// A running command whose counters an admin scrape can gather.
public protocol MetricsSource: AnyObject, Sendable {
    /// Gathers every loop's counters on its own loop and merges them. Runs on the main loop.
    func gatherMetrics() async -> MetricsSnapshot
}
