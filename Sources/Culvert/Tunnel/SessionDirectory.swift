import Synchronization
import Reactor

/// The server's authenticated sessions and secret services, across every loop: where a
/// data channel finds the session it belongs to, and a visitor the client that exposes
/// a secret service. Looked up once per new connection (the control path), never per
/// byte, so one lock is cheap here. A session is only ever touched on its own loop: the
/// directory hands out the loop with it.
final class SessionDirectory: Sendable {
    /// A session and the loop it lives on.
    struct Entry: @unchecked Sendable {
        let loop: EventLoop
        let session: ServerSession
    }

    private struct State {
        var maxSessions: Int
        var sessions: [TunnelProtocol.Key16: Entry] = [:]
        var secrets: [String: (entry: Entry, serviceID: UInt32)] = [:]
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

    func secret(_ name: String) -> (entry: Entry, serviceID: UInt32)? {
        state.withLock { $0.secrets[name] }
    }
}
