import Reactor
import Transfer

/// Why a UDP session ended; the label is what the log line says.
enum UDPSessionEnd: String {
    case idleTimeout = "idle-timeout"
    /// The target answered with ICMP port unreachable (ECONNREFUSED) or another error.
    case targetError = "target-error"
    case shutdown
}

/// One client address's session: a UDP socket connected to the chosen target, its
/// counters and last activity. Sticks to its target for its whole life.
///
/// Thread confinement: lives on its worker's loop.
final class UDPSession: EventHandler {
    let client: SocketAddress
    let attempt: TargetSet.Attempt
    let fd: Int32
    /// The listening socket the client came in on; replies leave through it.
    let listenerFD: Int32
    var registration: Registration?
    let startedAt: UInt64
    var lastActivity: UInt64
    var datagramsUp: UInt64 = 0
    var bytesUp: UInt64 = 0
    var datagramsDown: UInt64 = 0
    var bytesDown: UInt64 = 0
    private unowned let worker: UDPWorker

    init(client: SocketAddress, attempt: TargetSet.Attempt, fd: Int32, listenerFD: Int32, now: UInt64, worker: UDPWorker) {
        self.client = client
        self.attempt = attempt
        self.fd = fd
        self.listenerFD = listenerFD
        self.startedAt = now
        self.lastActivity = now
        self.worker = worker
    }

    func handleEvents(_ events: UInt32, tag: UInt8) {
        worker.relayReplies(of: self)
    }
}
