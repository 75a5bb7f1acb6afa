import Reactor

/// Everything `culvert forward tcp` needs, whether it came from flags or a config file.
public struct TCPForwardConfig: Sendable {
    public var listen: HostPort
    public var targets: [HostPort]
    public var balance: BalanceStrategy = .roundRobin
    public var connectTimeout: Duration = .seconds(5)
    public var idleTimeout: Duration?
    /// 0 means unlimited.
    public var maxConnections: Int = 0
    public var drainTimeout: Duration = .seconds(30)
    public var threads: Int = LoopGroup.coreCount
    /// false forces the buffered copier (for comparison and tests).
    public var splice: Bool = true

    public init(listen: HostPort, targets: [HostPort]) {
        self.listen = listen
        self.targets = targets.map(\.asTarget)
    }
}
