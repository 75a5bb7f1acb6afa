import Synchronization
import Reactor

/// The server's authenticated sessions, their public ports and secret services, across
/// every loop: where a data channel finds the session it belongs to, a visitor the
/// client that exposes a secret service, and a client asking for a taken port the
/// sessions that hold it. Looked up once per new connection (the control path), never per
/// byte, so one lock is cheap here. A session is only ever touched on its own loop: the
/// directory hands out the loop with it.
final class SessionDirectory: Sendable {
    /// A session and the loop it lives on.
    struct Entry: @unchecked Sendable {
        let loop: EventLoop
        let session: ServerSession
    }

    /// A public port as services claim it: TCP and UDP ports of one number are distinct.
    struct Port: Hashable {
        let udp: Bool
        let number: UInt16
    }

    private struct State {
        var maxSessions: Int
        var sessions: [TunnelProtocol.Key16: Entry] = [:]
        var secrets: [String: (entry: Entry, serviceID: UInt32)] = [:]
        /// Several sessions may hold one port number on different bind addresses.
        var ports: [Port: [Entry]] = [:]
        /// Sessions whose client said goodbye, oldest first.
        var departed: [TunnelProtocol.Key16] = []
    }

    private let state: Mutex<State>

    init(maxSessions: Int) {
        state = Mutex(State(maxSessions: maxSessions))
    }

    /// A reload changed `max_clients`: sessions beyond a lower limit stay, new ones wait.
    func setMaxSessions(_ n: Int) { state.withLock { $0.maxSessions = n } }

    var count: Int { state.withLock { $0.sessions.count } }

    /// Adds a session unless the server already has `maxSessions`.
    func add(_ id: [UInt8], _ entry: Entry) -> Bool {
        state.withLock {
            guard $0.sessions.count < $0.maxSessions else { return false }
            $0.sessions[TunnelProtocol.Key16(id)] = entry
            return true
        }
    }

    func remove(_ id: [UInt8]) {
        _ = state.withLock { $0.sessions.removeValue(forKey: TunnelProtocol.Key16(id)) }
    }

    func session(_ id: [UInt8]) -> Entry? {
        state.withLock { $0.sessions[TunnelProtocol.Key16(id)] }
    }

    /// The session's client said goodbye: a data channel of it that arrives late (opened
    /// before the goodbye, on another connection) is turned away without a warning.
    /// The last `departedKept` are remembered.
    func departed(_ id: [UInt8]) {
        state.withLock {
            $0.departed.append(TunnelProtocol.Key16(id))
            if $0.departed.count > Self.departedKept { $0.departed.removeFirst() }
        }
    }

    func hasDeparted(_ id: [UInt8]) -> Bool {
        state.withLock { $0.departed.contains(TunnelProtocol.Key16(id)) }
    }

    private static let departedKept = 64

    /// Claims a secret service name; false when another session holds it.
    func claimSecret(_ name: String, by entry: Entry, serviceID: UInt32) -> Bool {
        state.withLock {
            guard $0.secrets[name] == nil else { return false }
            $0.secrets[name] = (entry, serviceID)
            return true
        }
    }

    /// Releases a name, if `session` still holds it.
    func releaseSecret(_ name: String, by session: ServerSession) {
        state.withLock {
            if $0.secrets[name]?.entry.session === session { $0.secrets[name] = nil }
        }
    }

    /// Records that `entry`'s session listens on `port`.
    func claimPort(_ port: Port, by entry: Entry) {
        state.withLock { $0.ports[port, default: []].append(entry) }
    }

    func releasePort(_ port: Port, by session: ServerSession) {
        state.withLock {
            $0.ports[port]?.removeAll { $0.session === session }
            if $0.ports[port]?.isEmpty == true { $0.ports[port] = nil }
        }
    }

    /// The sessions listening on `port`, on whatever address.
    func holders(of port: Port) -> [Entry] {
        state.withLock { $0.ports[port] ?? [] }
    }

    func secret(_ name: String) -> (entry: Entry, serviceID: UInt32)? {
        state.withLock { $0.secrets[name] }
    }
}
