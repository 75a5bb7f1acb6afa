/// `GET /status`: the command's state as one JSON object, for people and scripts that
/// want a look rather than a time series.
enum StatusReport {
    static func render(_ m: MetricsSnapshot, command: String) -> String {
        let q = StderrLogHandler.jsonString
        let services = m.services.keys.sorted().map { name -> String in
            let s = m.services[name]!
            var fields = [
                "\"name\":\(q(name))", "\"kind\":\(q(s.kind))",
                "\"ports\":[" + s.ports.map(q).joined(separator: ",") + "]",
                "\"connections_active\":\(s.active)", "\"connections_total\":\(s.total)",
                "\"bytes_up\":\(s.bytesUp)", "\"bytes_down\":\(s.bytesDown)",
            ]
            if s.kind == "udp" {
                fields += ["\"datagrams_up\":\(s.datagramsUp)", "\"datagrams_down\":\(s.datagramsDown)",
                           "\"datagrams_dropped\":\(s.dropped.values.reduce(0, +))"]
            }
            return "{" + fields.joined(separator: ",") + "}"
        }
        let all = m.services.values
        var fields = [
            "\"command\":\(q(command))", "\"version\":\(q(ProcessMetrics.version))",
            "\"uptime_seconds\":\(PrometheusText.format(ProcessMetrics.uptimeSeconds))",
            "\"config_generation\":\(ProcessMetrics.configGeneration)",
            "\"sessions\":\(m.tunnelSessions)",
            "\"connections\":{\"active\":\(all.reduce(0) { $0 + $1.active }),\"total\":\(all.reduce(0) { $0 + $1.total })}",
            "\"bytes\":{\"up\":\(all.reduce(0) { $0 + $1.bytesUp }),\"down\":\(all.reduce(0) { $0 + $1.bytesDown })}",
            "\"services\":[" + services.joined(separator: ",") + "]",
        ]
        if let server = m.tunnelServer { fields.append("\"server\":\(q(server))") }
        return "{" + fields.joined(separator: ",") + "}"
    }
}
