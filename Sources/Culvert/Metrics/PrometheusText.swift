/// Renders a snapshot in the Prometheus text exposition format 0.0.4: a `# HELP` and
/// `# TYPE` line per family, then its samples. Label values are service names and fixed
/// reasons, never peer addresses, so the number of series stays bounded.
enum PrometheusText {
    static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    static func render(_ m: MetricsSnapshot, command: String) -> String {
        var out = ""
        func family(_ name: String, _ type: String, _ help: String) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        }
        func sample(_ name: String, _ labels: [(String, String)] = [], _ value: String) {
            if labels.isEmpty {
                out += "\(name) \(value)\n"
            } else {
                out += "\(name){" + labels.map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",") + "} \(value)\n"
            }
        }
        let names = m.services.keys.sorted()

        family("culvert_build_info", "gauge", "Always 1; the labels say which culvert runs which command.")
        sample("culvert_build_info", [("version", ProcessMetrics.version), ("command", command)], "1")
        family("culvert_uptime_seconds", "gauge", "Seconds since the command started.")
        sample("culvert_uptime_seconds", [], format(ProcessMetrics.uptimeSeconds))

        family("culvert_connections_active", "gauge", "Connections (UDP: sessions) open now.")
        for n in names { sample("culvert_connections_active", [("service", n)], "\(m.services[n]!.active)") }
        family("culvert_connections_total", "counter", "Connections (UDP: sessions) ended or refused, by result.")
        for n in names {
            for (result, count) in m.services[n]!.results.sorted(by: { $0.key < $1.key }) {
                sample("culvert_connections_total", [("service", n), ("result", result)], "\(count)")
            }
        }
        family("culvert_transfer_bytes_total", "counter", "Payload bytes relayed; up is client to target, down is target to client.")
        for n in names {
            sample("culvert_transfer_bytes_total", [("service", n), ("direction", "up")], "\(m.services[n]!.bytesUp)")
            sample("culvert_transfer_bytes_total", [("service", n), ("direction", "down")], "\(m.services[n]!.bytesDown)")
        }
        family("culvert_udp_datagrams_total", "counter", "Datagrams relayed by UDP services.")
        for n in names where m.services[n]!.kind == "udp" {
            sample("culvert_udp_datagrams_total", [("service", n), ("direction", "up")], "\(m.services[n]!.datagramsUp)")
            sample("culvert_udp_datagrams_total", [("service", n), ("direction", "down")], "\(m.services[n]!.datagramsDown)")
        }
        family("culvert_udp_dropped_total", "counter", "Datagrams dropped, by reason.")
        for n in names {
            for (reason, count) in m.services[n]!.dropped.sorted(by: { $0.key < $1.key }) {
                sample("culvert_udp_dropped_total", [("service", n), ("reason", reason)], "\(count)")
            }
        }

        family("culvert_tunnel_sessions", "gauge", "Tunnel sessions up: connected clients (server), 0 or 1 (client).")
        sample("culvert_tunnel_sessions", [], "\(m.tunnelSessions)")
        family("culvert_tunnel_reconnects_total", "counter", "Times the client connected to its server again.")
        sample("culvert_tunnel_reconnects_total", [], "\(m.tunnelReconnects)")
        if let server = m.tunnelServer {
            family("culvert_tunnel_server_info", "gauge", "1, labelled with the server that holds the client's services now.")
            sample("culvert_tunnel_server_info", [("server", server)], "1")
        }
        family("culvert_auth_failures_total", "counter", "Tunnel connections refused in authentication, by reason.")
        for (reason, count) in m.authFailures.sorted(by: { $0.key < $1.key }) {
            sample("culvert_auth_failures_total", [("reason", reason)], "\(count)")
        }
        let reloads = ProcessMetrics.reloads
        family("culvert_config_reloads_total", "counter", "Config reloads, by result.")
        sample("culvert_config_reloads_total", [("result", "applied")], "\(reloads.applied)")
        sample("culvert_config_reloads_total", [("result", "failed")], "\(reloads.failed)")
        family("culvert_config_generation", "gauge", "1 for the config at start, one more per applied reload.")
        sample("culvert_config_generation", [], "\(ProcessMetrics.configGeneration)")

        family("culvert_connect_duration_seconds", "histogram", "Time from a connection's arrival until its target answered.")
        var cumulative: UInt64 = 0
        for (i, bound) in Histogram.bounds.enumerated() {
            cumulative += m.connectDuration.counts[i]
            sample("culvert_connect_duration_seconds_bucket", [("le", format(bound))], "\(cumulative)")
        }
        sample("culvert_connect_duration_seconds_bucket", [("le", "+Inf")], "\(m.connectDuration.count)")
        sample("culvert_connect_duration_seconds_sum", [], format(m.connectDuration.sum))
        sample("culvert_connect_duration_seconds_count", [], "\(m.connectDuration.count)")
        return out
    }

    /// A label value: backslash, double quote and newline escaped, as the format requires.
    static func escape(_ value: String) -> String {
        var out = ""
        for c in value.unicodeScalars {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }

    /// A float as Go's strconv prints it for these values (`0.005`, `1`, `2.5`).
    static func format(_ value: Double) -> String {
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return "\(value)"
    }
}
