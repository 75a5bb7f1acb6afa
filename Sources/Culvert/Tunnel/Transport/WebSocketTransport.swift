#if canImport(Glibc)
import Glibc
#endif
import Reactor
import Transfer

/// What the tunnel's WebSocket transport needs beyond the transport's name: the path,
/// the keepalive, the inner layer, and the client's request details.
public struct TunnelWebSocket: Equatable, Sendable {
    /// The layer inside the WebSocket, under the tunnel's frames.
    public enum Inner: String, CaseIterable, Sendable {
        /// The token's TLS-PSK end to end: a proxy that terminates the outer TLS sees ciphertext.
        case tls
        /// Nothing: the hop is trusted, or wss alone protects it.
        case plain
    }

    /// The path the server upgrades (any other gets 404) and the client asks for.
    public var path = "/"
    public var inner = Inner.tls
    /// This end's ping interval on each tunnel WebSocket (and the pong deadline); nil: none.
    public var ping: Duration? = WebSocketStream.Settings.defaultPingInterval
    /// Extra request headers the client sends (`--header`).
    public var headers: [(name: String, value: String)] = []
    /// The `Host` header when it must differ from the server's name (`--host-header`).
    public var hostHeader: String?
    /// The TLS server name for wss when it must differ from the server's name (`--sni`).
    public var serverName: String?

    public init() {}

    public static func == (a: TunnelWebSocket, b: TunnelWebSocket) -> Bool {
        a.path == b.path && a.inner == b.inner && a.ping == b.ping && a.hostHeader == b.hostHeader && a.serverName == b.serverName
            && a.headers.elementsEqual(b.headers, by: { $0.name == $1.name && $0.value == $1.value })
    }
}

/// The tunnel inside a WebSocket (RFC 6455), for networks where only HTTP(S) gets out
/// or a reverse proxy owns the port. Stack per connection: TCP, TLS for `wss` (the
/// server's certificate, or the client's check of one), the HTTP upgrade and
/// `WebSocketStream`, then the token's TLS-PSK (`--inner tls`, the default) and the
/// tunnel's frames as on any transport. Every connection (control channel, carrier,
/// data channel) is one WebSocket; none splices.
struct WebSocketTransport: Transport {
    /// Which end this is, and what it puts in or expects of the upgrade.
    private enum Role {
        case server(path: String)
        /// `serverName`: SNI and the name the certificate must carry (wss);
        /// `fingerprint`: the pinned certificate instead of a CA check.
        case client(request: WebSocketHandshake.Request, serverName: String, fingerprint: [UInt8]?)
    }

    private let role: Role
    /// TLS under the WebSocket (`wss`); nil for `ws`.
    private let outerTLS: TLSContext?
    /// The token's TLS-PSK inside the WebSocket; nil with `--inner plain`.
    private let innerTLS: TLSTransport?
    private let settings: WebSocketStream.Settings

    init(server config: TunnelServerConfig, keys: TokenKeys) throws {
        role = .server(path: config.webSocket.path)
        if config.transport == .wss, let cert = config.certFile, let key = config.keyFile {
            outerTLS = try TLSContext.server(certificate: cert, key: key)
        } else {
            outerTLS = nil
        }
        innerTLS = config.webSocket.inner == .tls ? try TLSTransport(psk: keys, server: true) : nil
        // The stream carries the interval; its owner starts the pings on the loop the
        // connection ends up on (a data channel moves on from the accepting loop).
        settings = WebSocketStream.Settings(pingInterval: config.webSocket.ping)
    }

    init(client config: TunnelClientConfig, keys: TokenKeys) throws {
        let ws = config.webSocket
        let secure = config.transport == .wss
        let host = config.server.host ?? "127.0.0.1"
        let name = host.contains(":") ? "[\(host)]" : host
        let authority = config.server.port == (secure ? 443 : 80) ? name : "\(name):\(config.server.port)"
        role = .client(request: WebSocketHandshake.Request(host: ws.hostHeader ?? authority, path: ws.path, headers: ws.headers),
                       serverName: ws.serverName ?? host, fingerprint: config.fingerprint)
        if !secure {
            outerTLS = nil
        } else if config.fingerprint != nil || config.caFile != nil {
            outerTLS = try TLSContext.client(caFile: config.caFile)
        } else {
            outerTLS = try TLSContext.clientWithSystemCAs()
        }
        innerTLS = ws.inner == .tls ? try TLSTransport(psk: keys, server: false) : nil
        settings = WebSocketStream.Settings(pingInterval: ws.ping)
    }

    var warning: String? {
        guard innerTLS == nil else { return nil }
        return outerTLS == nil ? "transport is ws with --inner plain: tunnel traffic is not encrypted by culvert" : nil
    }

    func wrap(_ fd: Int32) throws -> (stream: Duplex, handshake: Handshake) {
        let outer: Duplex
        if let outerTLS {
            do {
                if case .client(_, let serverName, nil) = role {
                    outer = try TLSStream(fd: fd, context: outerTLS, serverName: serverName)
                } else {
                    outer = try TLSStream(fd: fd, context: outerTLS)
                }
            } catch {
                Posix.close(fd)
                throw error
            }
        } else {
            // Accepted sockets inherit TCP_NODELAY from the listener.
            if case .server = role { outer = TCPStream(fd: fd, noDelay: false) } else { outer = TCPStream(fd: fd) }
        }
        return (outer, { channel in try await handshake(channel) })
    }

    /// Outer TLS, the upgrade, the inner TLS; each layer goes over the channel's stream
    /// once its own handshake is done.
    private func handshake(_ channel: AsyncDuplex) async throws {
        if let tls = channel.duplex as? TLSStream { try await outerHandshake(tls, on: channel) }
        let ws: WebSocketStream
        switch role {
        case .server(let path):
            if outerTLS == nil { try await refuseOtherTransports(channel) }
            let leftover = try await WebSocketHandshake.accept(on: channel, path: path)
            ws = WebSocketStream(wrapping: channel.duplex, role: .server, settings: settings, leftover: leftover)
        case .client(let request, _, _):
            let leftover = try await WebSocketHandshake.connect(on: channel, request: request)
            ws = WebSocketStream(wrapping: channel.duplex, role: .client, settings: settings, leftover: leftover)
        }
        channel.layer(ws)
        if let innerTLS {
            let (tls, handshake) = try innerTLS.layer(over: ws)
            channel.layer(tls)
            try await handshake(channel)
        }
        // A client's connection stays on the loop that made it.
        if case .client = role { ws.startLayerKeepalive(on: channel.loop) }
    }

    private func outerHandshake(_ tls: TLSStream, on channel: AsyncDuplex) async throws {
        do {
            while try tls.handshakeStep() != .done { try await channel.waitForReadiness() }
        } catch let error as TLSError {
            guard case .client(let request, _, _) = role else { throw error }
            throw WebSocketHandshakeError("TLS with \(request.host) failed: \(error.message); check the certificate (--ca FILE, --fingerprint, --sni NAME) or use ws:// for a plain endpoint")
        }
        if case .client(_, _, let pinned?) = role {
            guard let actual = tls.peerFingerprint(), TunnelCrypto.constantTimeEqual(actual, pinned) else {
                throw FatalClientError(message: "authentication failed: server certificate fingerprint does not match --fingerprint")
            }
        }
    }

    /// A client on `--transport tls` or `plain` speaks first with a ClientHello or a
    /// hello frame, never HTTP: it gets the plain refusal it recognises instead of a
    /// wait for a request head that never comes.
    private func refuseOtherTransports(_ channel: AsyncDuplex) async throws {
        guard let head = try await TransportMismatch.firstBytes(of: channel) else { throw ChannelError.eof }
        if TransportMismatch.isTLSRecord(head) || TransportMismatch.isFrame(head, of: TunnelProtocol.Hello.self) {
            throw TransportMismatch.refuse(channel.duplex.fd, .clientSpeaksTunnel)
        }
    }
}

extension TransportMismatch {
    static let clientSpeaksTunnel = TransportMismatch(
        description: "the client connects with --transport tls or plain; this server uses --transport ws/wss (give the client the server as ws://HOST:PORT/PATH or wss://…)")
}
