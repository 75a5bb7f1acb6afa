import Reactor
import Transfer

/// A `ws://` or `wss://` endpoint as a user writes it.
public struct WebSocketURL: Equatable, CustomStringConvertible, Sendable {
    public let secure: Bool
    public let host: String
    public let port: UInt16
    /// Path and query, as sent in the request line (`/` when the URL has none).
    public let path: String

    /// Whether `text` is meant as a WebSocket URL rather than a HOST:PORT.
    public static func looksLikeURL(_ text: String) -> Bool {
        let lower = text.lowercased()
        return lower.hasPrefix("ws://") || lower.hasPrefix("wss://")
    }

    public static func parse(_ text: String) throws(ConfigError) -> WebSocketURL {
        func bad(_ why: String) -> ConfigError {
            ConfigError(setting: "<targets>", "invalid WebSocket URL '\(text)': \(why); write ws://HOST[:PORT]/PATH or wss://HOST[:PORT]/PATH")
        }
        let lower = text.lowercased()
        let secure = lower.hasPrefix("wss://")
        guard secure || lower.hasPrefix("ws://") else { throw bad("the scheme must be ws or wss") }
        let rest = text.dropFirst(secure ? 6 : 5)
        let slash = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? rest.endIndex
        let authority = String(rest[..<slash])
        var path = String(rest[slash...])
        if path.isEmpty { path = "/" } else if path.hasPrefix("?") { path = "/" + path }
        if let hash = path.firstIndex(of: "#") { path = String(path[..<hash]) }
        guard !authority.contains("@") else { throw bad("credentials in the URL are not supported; use --header 'Authorization: ...'") }
        guard path.allSatisfy({ $0.isASCII && !$0.isWhitespace }) else { throw bad("the path must be ASCII without spaces (percent-encode the rest)") }
        let defaultPort: UInt16 = secure ? 443 : 80
        let hasPort = authority.hasPrefix("[") ? authority.contains("]:") : authority.contains(":")
        let spec: HostPort
        do {
            spec = try HostPort.parse(hasPort ? authority : "\(authority):\(defaultPort)")
        } catch {
            throw bad(error.reason)
        }
        guard let host = spec.host else { throw bad("the host is missing") }
        return WebSocketURL(secure: secure, host: host, port: spec.port, path: path)
    }

    /// The `Host` header: the port only when it is not the scheme's default.
    public var authority: String {
        let name = host.contains(":") ? "[\(host)]" : host
        return port == (secure ? 443 : 80) ? name : "\(name):\(port)"
    }

    public var target: HostPort { HostPort(host: host, port: port) }

    public var description: String { "\(secure ? "wss" : "ws")://\(authority)\(path)" }
}

extension WebSocketStream.Settings {
    mutating func set(ping: Duration??, maxMessage: Int?) {
        if let ping { pingInterval = ping }
        if let maxMessage { self.maxMessage = maxMessage }
    }
}

/// The server end of `forward ws`: which path upgrades, TLS when a certificate is given.
public struct WebSocketIngress: Equatable, Sendable {
    public var path = "/"
    public var certFile: String?
    public var keyFile: String?
    public var settings = WebSocketStream.Settings()
    /// Time a new connection gets for its TLS and upgrade handshakes.
    public var handshakeTimeout: Duration = .seconds(10)

    public init() {}

    /// `--ws-ping` and `--ws-max-message` over the defaults (nil: not given).
    public mutating func setLimits(ping: Duration??, maxMessage: Int?) { settings.set(ping: ping, maxMessage: maxMessage) }

    var isSecure: Bool { certFile != nil }
}

/// The client end of `forward tcp … ws://`: the endpoint, what the request carries, and
/// how the server's certificate is verified.
public struct WebSocketEgress: Equatable, Sendable {
    public var url: WebSocketURL
    public var headers: [(name: String, value: String)] = []
    /// The `Host` header when it must differ from the URL's (a CDN's edge name).
    public var hostHeader: String?
    /// The TLS server name (SNI and certificate check) when it must differ from the URL's host.
    public var serverName: String?
    /// Verify against this CA file instead of the system store.
    public var caFile: String?
    public var settings = WebSocketStream.Settings()
    public var handshakeTimeout: Duration = .seconds(10)

    public init(url: WebSocketURL) { self.url = url }

    /// Field by field; the headers in order (a reload compares running and new settings).
    public static func == (a: WebSocketEgress, b: WebSocketEgress) -> Bool {
        a.url == b.url && a.headers.elementsEqual(b.headers, by: { $0.name == $1.name && $0.value == $1.value })
            && a.hostHeader == b.hostHeader && a.serverName == b.serverName && a.caFile == b.caFile
            && a.settings == b.settings && a.handshakeTimeout == b.handshakeTimeout
    }

    /// `--ws-ping` and `--ws-max-message` over the defaults (nil: not given).
    public mutating func setLimits(ping: Duration??, maxMessage: Int?) { settings.set(ping: ping, maxMessage: maxMessage) }

    /// Parses a `--header 'Name: value'` argument.
    public static func parseHeader(_ text: String) throws(ConfigError) -> (name: String, value: String) {
        guard let colon = text.firstIndex(of: ":"), colon != text.startIndex else {
            throw ConfigError(setting: "--header", "--header '\(text)' is not 'Name: value'")
        }
        let name = String(text[..<colon])
        let value = String(text[text.index(after: colon)...]).trimmingWhitespace()
        guard name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_".contains($0)) }) else {
            throw ConfigError(setting: "--header", "--header '\(text)': '\(name)' is not a header name")
        }
        guard !value.contains("\r") && !value.contains("\n") else {
            throw ConfigError(setting: "--header", "--header '\(text)': the value may not contain line breaks")
        }
        let reserved = ["host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
                        ChannelBinding.header.lowercased(), ChannelBinding.innerHeader.lowercased()]
        guard !reserved.contains(name.lowercased()) else {
            throw ConfigError(setting: "--header", "--header '\(name)' is set by the upgrade itself\(name.lowercased() == "host" ? "; use --host-header" : "")")
        }
        return (name, value)
    }
}

/// A forwarder's WebSocket ends made ready for use on any loop: the settings and the
/// TLS contexts, built once at start so a bad certificate or CA file fails the start.
final class WebSocketLayers: @unchecked Sendable {
    let ingress: WebSocketIngress?
    let egress: WebSocketEgress?
    private let serverTLS: TLSContext?
    private let clientTLS: TLSContext?

    init(ingress: WebSocketIngress?, egress: WebSocketEgress?) throws {
        self.ingress = ingress
        self.egress = egress
        if let ingress, let cert = ingress.certFile, let key = ingress.keyFile {
            serverTLS = try TLSContext.server(certificate: cert, key: key)
        } else {
            serverTLS = nil
        }
        if let egress, egress.url.secure {
            clientTLS = try egress.caFile.map { (ca) throws(TLSError) in try TLSContext.client(caFile: ca) } ?? TLSContext.clientWithSystemCAs()
        } else {
            clientTLS = nil
        }
    }

    /// An accepted connection in its control phase, TLS-wrapped for `wss`; nil without an ingress.
    func incomingChannel(_ fd: Int32, on loop: EventLoop) throws -> AsyncDuplex {
        try channel(fd, tls: serverTLS, serverName: nil, on: loop)
    }

    func outgoingChannel(_ fd: Int32, on loop: EventLoop) throws -> AsyncDuplex {
        try channel(fd, tls: clientTLS, serverName: egress.map { $0.serverName ?? $0.url.host }, on: loop)
    }

    private func channel(_ fd: Int32, tls: TLSContext?, serverName: String?, on loop: EventLoop) throws -> AsyncDuplex {
        let stream: Duplex
        do {
            stream = try tls.map { (context) throws(TLSError) in try TLSStream(fd: fd, context: context, serverName: serverName) } ?? TCPStream(fd: fd)
        } catch {
            Posix.close(fd)
            throw error
        }
        do {
            return try AsyncDuplex(loop: loop, duplex: stream)
        } catch {
            stream.close(reset: true)
            throw error
        }
    }

    /// TLS (for wss) and the server's side of the upgrade; the channel is detached into
    /// the WebSocket stream. Throws `WebSocketRefusal` after answering a bad request.
    func acceptUpgrade(on channel: AsyncDuplex) async throws -> WebSocketStream {
        guard let ingress else { throw ChannelError.closed }
        try await Self.tlsHandshake(channel)
        let leftover = try await WebSocketHandshake.accept(on: channel, path: ingress.path)
        return WebSocketStream(wrapping: channel.detach(), role: .server, settings: ingress.settings, leftover: leftover)
    }

    /// TLS (for wss) and the client's side of the upgrade. Throws
    /// `WebSocketHandshakeError` naming the likely cause when the server does not upgrade.
    func connectUpgrade(on channel: AsyncDuplex) async throws -> WebSocketStream {
        guard let egress else { throw ChannelError.closed }
        do {
            try await Self.tlsHandshake(channel)
        } catch let error as TLSError {
            throw WebSocketHandshakeError("TLS with \(egress.url.authority) failed: \(error.message); check the certificate (--ca FILE, --sni NAME) or use ws:// for a plain endpoint")
        }
        let request = WebSocketHandshake.Request(host: egress.hostHeader ?? egress.url.authority, path: egress.url.path, headers: egress.headers)
        let (leftover, _) = try await WebSocketHandshake.connect(on: channel, request: request)
        return WebSocketStream(wrapping: channel.detach(), role: .client, settings: egress.settings, leftover: leftover)
    }

    private static func tlsHandshake(_ channel: AsyncDuplex) async throws {
        guard let tls = channel.duplex as? TLSStream else { return }
        while try tls.handshakeStep() != .done { try await channel.waitForReadiness() }
    }
}
