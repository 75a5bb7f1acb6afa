#if canImport(Glibc)
import Glibc
#endif
import Reactor
import Transfer

/// The server's policy for exposed ports (allowed ranges, allowed bind addresses) and
/// the binding of a service's listening sockets under it. Immutable, so every loop may
/// use it.
struct PortPolicy: Sendable {
    let config: TunnelServerConfig

    /// Binds the listeners for a service request, or says why not. Without a BIND (and
    /// without --bind-addr) a service listens on every address, IPv4 and IPv6, on one port.
    func bind(_ request: TunnelProtocol.ServiceRequest) -> Result<[(Int32, SocketAddress)], TunnelProtocol.Refusal> {
        let wildcard = request.bindHost.isEmpty && config.bindAddresses.isEmpty
        let hosts = wildcard ? ["0.0.0.0", "::"] : [request.bindHost.isEmpty ? config.bindAddresses[0] : request.bindHost]
        if !config.bindAddresses.isEmpty && !config.bindAddresses.contains(hosts[0]) {
            return .failure(TunnelProtocol.Refusal(.bindNotAllowed, "bind address \(hosts[0]) is not allowed (allowed: \(config.bindAddresses.joined(separator: ",")))"))
        }
        var bases: [SocketAddress] = []
        for host in hosts {
            guard let base = SocketAddress(numericHost: host, port: 0) else {
                return .failure(TunnelProtocol.Refusal(.bindNotAllowed, "bind address '\(host)' is not a numeric IP address"))
            }
            bases.append(base)
        }
        let ports: [UInt16]
        if request.port != 0 {
            guard config.allowPorts.contains(request.port) else {
                return .failure(TunnelProtocol.Refusal(.portNotAllowed, "port \(request.port) is not allowed (allowed: \(config.allowPorts))"))
            }
            ports = [request.port]
        } else {
            let candidates = Array(config.allowPorts.ranges.flatMap { $0 }.shuffled().prefix(256))
            ports = config.allowPorts.coversEphemeralRange ? [0] + candidates : candidates
        }
        let udp = request.kind == .udp
        var lastError: SystemError?
        for port in ports {
            switch bindAll(bases, port: port, ipv6Optional: wildcard, udp: udp) {
            case .success(let bound): return .success(bound)
            case .failure(let error): lastError = error
            }
        }
        if request.port != 0, let lastError {
            return .failure(lastError.errno == EADDRINUSE
                ? TunnelProtocol.Refusal(.portInUse, "port \(request.port) is already in use")
                : TunnelProtocol.Refusal(.listenFailed, "cannot listen on port \(request.port): \(lastError)"))
        }
        return .failure(TunnelProtocol.Refusal(.noFreePort, "no free port in the allowed ranges (\(config.allowPorts))"))
    }

    /// Listens on every base address with one port (0: the kernel's choice for the
    /// first, then the same for the rest); all or nothing.
    private func bindAll(_ bases: [SocketAddress], port: UInt16, ipv6Optional: Bool, udp: Bool) -> Result<[(Int32, SocketAddress)], SystemError> {
        var bound: [(Int32, SocketAddress)] = []
        var chosen = port
        for base in bases {
            do throws(SystemError) {
                let fd = udp ? try Net.udpListen(base.withPort(chosen), reusePort: false, bufferSize: 4 << 20)
                             : try Net.listen(base.withPort(chosen), reusePort: false)
                let address: SocketAddress
                do { address = try Net.localAddress(fd) } catch { Posix.close(fd); throw error }
                chosen = address.port
                bound.append((fd, address))
            } catch where ipv6Optional && base.family == AF_INET6 && (error.errno == EAFNOSUPPORT || error.errno == EADDRNOTAVAIL) {
                continue  // no IPv6 on this host: IPv4 alone
            } catch {
                for (fd, _) in bound { Posix.close(fd) }
                return .failure(error)
            }
        }
        return .success(bound)
    }
}
