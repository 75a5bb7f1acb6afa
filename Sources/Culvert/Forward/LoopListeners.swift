import Reactor
import Transfer

/// Listening sockets for a forwarder: for each listen address, one SO_REUSEPORT socket
/// per loop, so each loop accepts (or receives) on its own socket and keeps what arrives.
struct LoopListeners {
    typealias Listener = (fd: Int32, address: SocketAddress)

    /// The addresses actually bound (port 0 replaced by the port the kernel chose).
    let bound: [SocketAddress]
    /// `perLoop[i]` are loop i's sockets, one per bound address.
    let perLoop: [[Listener]]

    /// Binds everything or nothing: on failure every socket opened so far is closed.
    static func bind(_ addresses: [SocketAddress], loops: Int, spec: HostPort,
                     open: (SocketAddress) throws(SystemError) -> Int32) throws(ListenError) -> LoopListeners {
        var bound: [SocketAddress] = []
        var perLoop: [[Listener]] = Array(repeating: [], count: loops)
        do throws(SystemError) {
            for requested in addresses {
                var address = requested
                for i in 0..<loops {
                    let fd = try open(address)
                    if i == 0 {
                        do throws(SystemError) {
                            address = try Net.localAddress(fd)
                        } catch {
                            Posix.close(fd)
                            throw error
                        }
                        bound.append(address)
                    }
                    perLoop[i].append((fd, address))
                }
            }
        } catch {
            for listeners in perLoop { for l in listeners { Posix.close(l.fd) } }
            throw ListenError(address: spec, error: error)
        }
        return LoopListeners(bound: bound, perLoop: perLoop)
    }
}

/// A failure to bind a listening address: exit status 1, not a usage error.
/// Resolves a forwarder's targets off-loop; a target written without a host means this host.
func resolveTargets(_ specs: [HostPort], on loop: EventLoop) async throws -> [TargetSet.Target] {
    var resolved: [TargetSet.Target] = []
    for spec in specs {
        let addresses = try await Resolver.resolve(host: spec.host ?? "127.0.0.1", port: spec.port, passive: false, on: loop)
        resolved.append(TargetSet.Target(spec: spec, addresses: addresses))
    }
    return resolved
}
