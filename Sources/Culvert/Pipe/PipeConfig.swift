import Logging

/// Everything `culvert pipe` needs: where stdin and stdout are connected.
public enum PipeConfig: Sendable {
    /// A TCP port, reached directly.
    case address(HostPort, connectTimeout: Duration)
    /// A secret service behind a culvert server; `tunnel` names the server and holds the
    /// token, transport and connect timeout. `serviceToken` nil means the client's token.
    case secretService(name: String, serviceToken: String?, tunnel: TunnelClientConfig)
}

/// What `culvert pipe` was given on the command line; nil when not given.
public struct PipeFlags: Sendable {
    public var target: HostPort?
    public var via: HostPort?
    public var service: String?
    public var serviceTokenFile: String?
    public var token = TokenFlags()
    public var transport: TunnelTransport?
    public var ca: String?
    public var fingerprint: [UInt8]?
    public var connectTimeout: Duration?
    public var log = LogFlags()

    public init() {}

    /// The rules the flags must follow; `resolve` checks them first, and a command line
    /// parser may check them early to report them as usage.
    public func check() throws(ConfigError) {
        if case .address(let target) = try route() {
            do { try target.checkConnectable() } catch { throw ConfigError(setting: "<target>", error.description) }
        }
    }

    /// Where the flags point: exactly one of a target address or a server and a service.
    fileprivate func route() throws(ConfigError) -> PipeRoute {
        switch (target, via, service) {
        case (let target?, nil, nil): return .address(target)
        case (nil, let via?, let service?): return .secretService(via: via, name: service)
        case (.some, .some, _), (.some, _, .some):
            throw ConfigError(setting: "<target>", "give HOST:PORT or --via SERVER --service NAME, not both")
        case (nil, .some, nil): throw ConfigError(setting: "--service", "--via needs --service NAME")
        case (nil, nil, .some): throw ConfigError(setting: "--via", "--service needs --via SERVER")
        case (nil, nil, nil): throw ConfigError(setting: "<target>", "missing <target>: give HOST:PORT, or --via SERVER --service NAME")
        }
    }
}

/// The destination the pipe flags name, before the token is looked up.
private enum PipeRoute {
    case address(HostPort)
    case secretService(via: HostPort, name: String)
}

extension PipeConfig {
    /// The pipe's settings from `flags`, checked; logs at warning and above unless told
    /// otherwise, since stdout carries the connection's bytes.
    public static func resolve(flags: PipeFlags) throws(ConfigError) -> Resolved<PipeConfig> {
        try flags.check()
        let route = try flags.route()
        var defaultLog = LogSettings()
        defaultLog.level = .warning
        let log = flags.log.over(defaultLog)
        var tunnel = TunnelClientConfig()
        if let connectTimeout = flags.connectTimeout { tunnel.connectTimeout = connectTimeout }
        let via: HostPort, service: String
        switch route {
        case .address(let target): return Resolved(config: .address(target, connectTimeout: tunnel.connectTimeout), log: log)
        case .secretService(let server, let name): (via, service) = (server, name)
        }
        var warnings: [String] = []
        guard let token = try flags.token.resolve(nil, warnings: &warnings) else {
            throw ConfigError(setting: "--token-file", "no token: give --token-file FILE or set CULVERT_TOKEN")
        }
        tunnel.server = via
        tunnel.token = token
        if let transport = flags.transport { tunnel.transport = transport }
        tunnel.caFile = flags.ca
        tunnel.fingerprint = flags.fingerprint
        let serviceToken = try flags.serviceTokenFile.map { path throws(ConfigError) in
            try readServiceToken(at: path, setting: "--service-token-file", warnings: &warnings)
        }
        return Resolved(config: .secretService(name: service, serviceToken: serviceToken, tunnel: tunnel),
                        log: log, warnings: warnings)
    }
}
