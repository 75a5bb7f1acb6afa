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
        /// The token's TLS-PSK, unless the outer TLS of wss provably runs from client to
        /// server (`ChannelBinding`): then it already protects the tunnel end to end.
        case auto
        /// The token's TLS-PSK end to end always: a proxy that terminates the outer TLS sees ciphertext.
        case tls
        /// Nothing: the hop is trusted, or wss alone protects it.
        case plain
    }

    /// What protects the tunnel inside the WebSocket of a connection whose handshake is
    /// done, for its log line: `tls` (the token's TLS-PSK), `bound` (the outer TLS,
    /// proven end to end) or `plain`.
    func innerLayer(of stream: Duplex) -> String {
        if stream is TLSStream { return "tls" }
        return inner == .plain ? "plain" : "bound"
    }

    /// The path the server upgrades (any other gets 404) and the client asks for.
    public var path = "/"
    public var inner = Inner.auto
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
/// `WebSocketStream`, then the token's TLS-PSK (left out when `ChannelBinding` proves
/// the outer TLS end to end, or with `--inner plain`) and the tunnel's frames as on any
/// transport. Every connection (control channel, carrier, data channel) is one
/// WebSocket; none splices.
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
    /// The proofs over the outer TLS that let a connection leave the inner TLS out; nil
    /// without outer TLS, and on a client unless `--inner auto` or a server with `--inner tls`.
    private let binding: ChannelBinding?
    private let settings: WebSocketStream.Settings

    init(server config: TunnelServerConfig, keys: TokenKeys) throws {
        role = .server(path: config.webSocket.path)
        if config.transport == .wss, let cert = config.certFile, let key = config.keyFile {
            outerTLS = try TLSContext.server(certificate: cert, key: key)
        } else {
            outerTLS = nil
        }
        innerTLS = config.webSocket.inner == .plain ? nil : try TLSTransport(psk: keys, server: true)
        // A server on `--inner plain` answers too: the client then leaves its TLS-PSK out as well.
        binding = outerTLS != nil && config.webSocket.inner != .tls ? ChannelBinding(keys: keys) : nil
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
        innerTLS = ws.inner == .plain ? nil : try TLSTransport(psk: keys, server: false)
        binding = secure && ws.inner == .auto ? ChannelBinding(keys: keys) : nil
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
        var session: [UInt8]?
        if let tls = channel.duplex as? TLSStream {
            try await outerHandshake(tls, on: channel)
            session = binding.flatMap { _ in tls.keyingMaterial(label: ChannelBinding.exporterLabel) }
        }
        let ws: WebSocketStream
        var bound = false
        switch role {
        case .server(let path):
            if outerTLS == nil { try await refuseOtherTransports(channel) }
            let leftover = try await WebSocketHandshake.accept(on: channel, path: path) { request in
                guard let binding, let session, let claim = request.field(ChannelBinding.header),
                      binding.verify(claim, by: .client, session: session) else {
                    return ["\(ChannelBinding.innerHeader): \(innerTLS == nil ? "plain" : "tls")"]
                }
                bound = true
                return ["\(ChannelBinding.header): \(binding.proof(by: .server, session: session))"]
            }
            ws = WebSocketStream(wrapping: channel.duplex, role: .server, settings: settings, leftover: leftover)
        case .client(var request, _, _):
            if let binding, let session {
                request.headers.append((ChannelBinding.header, binding.proof(by: .client, session: session)))
            }
            let (leftover, answer) = try await WebSocketHandshake.connect(on: channel, request: request)
            if let binding, let session, let claim = answer.field(ChannelBinding.header) {
                // Only a server with the token sends a proof, and only over this very session.
                guard binding.verify(claim, by: .server, session: session) else {
                    throw WebSocketHandshakeError("the server's channel binding proof does not match this TLS session: something on the way rewrote the upgrade's answer")
                }
                bound = true
            }
            if !bound, let stated = answer.field(ChannelBinding.innerHeader) { try expectSameInner(as: stated) }
            ws = WebSocketStream(wrapping: channel.duplex, role: .client, settings: settings, leftover: leftover)
        }
        channel.layer(ws)
        if let innerTLS, !bound {
            let (tls, handshake) = try innerTLS.layer(over: ws)
            channel.layer(tls)
            try await handshake(channel)
        }
        // A client's connection stays on the loop that made it.
        if case .client = role { ws.startLayerKeepalive(on: channel.loop) }
    }

    /// Fails at once when the server says it runs another inner layer than this client
    /// will: the hint is not authenticated, so it may only ever stop a connection, never
    /// change what this end runs.
    private func expectSameInner(as stated: String) throws {
        let mine = innerTLS == nil ? "plain" : "tls"
        guard stated != mine else { return }
        let why = switch (stated, binding != nil) {
        case ("plain", true): "the server runs --inner plain and the proof that would let this client leave its TLS-PSK out did not check (a proxy between them terminates TLS)"
        case ("plain", false): "the server runs --inner plain and this client keeps the token's TLS-PSK inside the WebSocket"
        default: "the server keeps the token's TLS-PSK inside the WebSocket and this client runs --inner plain"
        }
        throw FatalClientError(message: "\(why); give both ends the same --inner (auto, the default, on both works straight and behind proxies)")
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

/// Proof that a wss connection's TLS runs from the client to the server with nothing
/// that terminates it on the way (channel binding, as RFC 9266 does for SCRAM). Each end
/// sends an HMAC, keyed from the token, of keying material exported from its TLS
/// session, in a header of the upgrade: the client's request, and the server's 101
/// answer when the client's proof matches its own session. A proxy or CDN that ends the
/// outer TLS holds two sessions with different material, and cannot make a proof for
/// either without the token, so the proofs only check where the outer TLS reaches the
/// server; then both ends leave the inner TLS-PSK out. A missing or failing proof keeps
/// the inner layer: tampering can only add encryption, never remove it.
struct ChannelBinding {
    /// The upgrade header both proofs travel in.
    static let header = "Culvert-Channel-Binding"
    /// The 101 header in which a server that did not bind states its inner layer (`tls`
    /// or `plain`), so a client on the other one fails with a clear reason.
    static let innerHeader = "Culvert-Inner"
    /// The exporter label RFC 9266 registers for TLS 1.3 channel bindings (32 bytes, no
    /// context); the proofs' own labels and key keep this use apart from any other.
    static let exporterLabel = "EXPORTER-Channel-Binding"

    /// Which end a proof speaks for: each end's proof differs, so neither can be echoed back.
    enum Signer: String { case client, server }

    private let key: [UInt8]

    init(keys: TokenKeys) { key = keys.channelBinding }

    /// The proof `signer` sends for a TLS session's exported material, base64.
    func proof(by signer: Signer, session: [UInt8]) -> String {
        WebSocketHandshake.base64(TunnelCrypto.hmacSHA256(key: key, Array("culvert/1 \(signer.rawValue) binding".utf8), session))
    }

    /// Whether `claim` is the proof `signer` makes over `session`.
    func verify(_ claim: String, by signer: Signer, session: [UInt8]) -> Bool {
        TunnelCrypto.constantTimeEqual(Array(claim.utf8), Array(proof(by: signer, session: session).utf8))
    }
}
