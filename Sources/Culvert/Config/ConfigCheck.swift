/// `culvert check`: which command a config file is for, and what that command would run,
/// in lines for people.
public enum ConfigCheck {
    /// The commands that read a config file.
    public enum Kind: String, CaseIterable, Sendable {
        case server, client, forward
    }

    /// The command a file is for, from its keys: `targets` (at the top or in a service
    /// table) or `protocol` make a forward file; `server`, `servers`, or services with
    /// `local`, a client file; anything else a server file.
    public static func detect(_ path: String) throws(ConfigError) -> Kind {
        let file = try ConfigFile(path: path)
        let top = file.keys()
        let inServices = file.keys(under: "services")
        if top.contains("targets") || top.contains("protocol") || inServices.contains("targets") { return .forward }
        if top.contains("server") || top.contains("servers") || inServices.contains("local") { return .client }
        return .server
    }

    /// `tcp` or `udp`: which `forward` command a forward file is for.
    public static func forwardProtocol(_ path: String) throws(ConfigError) -> String {
        try ForwardConfigFile.declaredProtocol(of: try ConfigFile(path: path))
    }

    public static func summary(_ config: TunnelServerConfig) -> [String] {
        [
            "server: listen \(config.listen.map(\.description).joined(separator: ",")), transport \(config.transport.rawValue)"
                + (config.certFile.map { " (certificate \($0))" } ?? ""),
            "  allow_ports \(config.allowPorts), bind_addr \(config.bindAddresses.isEmpty ? "any" : config.bindAddresses.joined(separator: ","))",
            "  max_clients \(config.maxClients), max_services \(config.maxServicesPerClient), max_unauthenticated \(config.maxUnauthenticated) (\(config.maxUnauthenticatedPerSource) per source)",
            "  heartbeat \(DurationSpec.format(config.heartbeat.interval)) x \(config.heartbeat.misses), handshake_timeout \(DurationSpec.format(config.handshakeTimeout)), drain_timeout \(DurationSpec.format(config.drainTimeout)), threads \(config.threads)",
        ]
    }

    public static func summary(_ config: TunnelClientConfig) -> [String] {
        var lines = [
            "client: server \(config.endpoints.map(\.description).joined(separator: ",")), transport \(config.transport.rawValue), \(config.services.count) service(s)",
            "  pool \(config.pool), mux \(config.mux), connect_timeout \(DurationSpec.format(config.connectTimeout)), drain_timeout \(DurationSpec.format(config.drainTimeout)), threads \(config.threads)",
        ]
        for s in config.services { lines.append("  " + describe(s)) }
        return lines
    }

    /// One service as the summary and the reload log show it.
    static func describe(_ s: ServiceSpec) -> String {
        switch s.kind {
        case .secret:
            return "secret \(s.name) -> \(s.localDescription)"
        case .proxy:
            let port = s.remotePort == 0 ? "any port" : "port \(s.remotePort)"
            return "proxy \(port)\(s.bindHost.map { " on \($0)" } ?? "") exits here (\(s.name))"
        case .tcp, .udp:
            let port = s.remotePort == 0 ? "any port" : "port \(s.remotePort)"
            return "\(s.kindName) \(port)\(s.bindHost.map { " on \($0)" } ?? "") -> \(s.localDescription) (\(s.name)\(s.compress ? ", compressed" : ""))"
        }
    }

    public static func summary(_ configs: [TCPForwardConfig]) -> [String] {
        guard let first = configs.first else { return [] }
        var lines = ["forward tcp: \(configs.count) listener(s), drain_timeout \(DurationSpec.format(first.drainTimeout)), threads \(first.threads)"]
        for c in configs {
            lines.append("  tcp \(c.listen) -> \(c.targets.map(\.description).joined(separator: ",")) (balance \(c.balance.rawValue), "
                + "connect_timeout \(DurationSpec.format(c.connectTimeout)), idle_timeout \(c.idleTimeout.map(DurationSpec.format) ?? "off"), "
                + "max_connections \(c.maxConnections == 0 ? "no limit" : "\(c.maxConnections)")\(c.splice ? "" : ", no_splice"))")
        }
        return lines
    }

    public static func summary(_ configs: [UDPForwardConfig]) -> [String] {
        guard let first = configs.first else { return [] }
        var lines = ["forward udp: \(configs.count) listener(s), threads \(first.threads)"]
        for c in configs {
            lines.append("  udp \(c.listen) -> \(c.targets.map(\.description).joined(separator: ",")) (balance \(c.balance.rawValue), "
                + "idle_timeout \(DurationSpec.format(c.idleTimeout)), max_sessions \(c.maxSessions.map { $0 == 0 ? "no limit" : "\($0)" } ?? "default"), "
                + "socket_buffer \(c.socketBuffer))")
        }
        return lines
    }
}
