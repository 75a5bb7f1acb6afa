import Reactor
import Transfer

/// TLS 1.3 (`TLSStream`): an external PSK derived from the token, or X.509 when the
/// server has a certificate. The client checks here what the handshake alone does not
/// prove: that the PSK was really used, or that the certificate is the pinned one.
struct TLSTransport: Transport {
    /// Who this end is, and what it verifies once the handshake is done.
    private enum Role {
        case server
        /// The token's PSK authenticates the server; a server that answers with a
        /// certificate instead was verified by nothing.
        case pskClient
        /// The server has a certificate: the handshake checks its chain and name against
        /// `--ca` (then `serverName` is sent as SNI), or the stream is compared with
        /// the pinned fingerprint afterwards.
        case certificateClient(serverName: String?, fingerprint: [UInt8]?)
    }

    private let context: TLSContext
    private let role: Role

    init(server config: TunnelServerConfig, keys: TokenKeys) throws {
        if let cert = config.certFile, let key = config.keyFile {
            context = try TLSContext.server(certificate: cert, key: key)
        } else {
            context = try TLSContext.psk(key: keys.tlsPSK, server: true)
        }
        role = .server
    }

    init(client config: TunnelClientConfig, keys: TokenKeys) throws {
        if config.caFile != nil || config.fingerprint != nil {
            context = try TLSContext.client(caFile: config.caFile)
            role = .certificateClient(serverName: config.caFile == nil ? nil : config.server.host, fingerprint: config.fingerprint)
        } else {
            context = try TLSContext.psk(key: keys.tlsPSK, server: false)
            role = .pskClient
        }
    }

    /// The token's PSK alone, for TLS inside another transport's stream (`layer(over:)`).
    init(psk keys: TokenKeys, server: Bool) throws {
        context = try TLSContext.psk(key: keys.tlsPSK, server: server)
        role = server ? .server : .pskClient
    }

    var warning: String? { nil }

    /// TLS inside `carrier`, which the stream owns from here on (closed on a throw), and
    /// its handshake with the same checks as `wrap`'s; the carrier's own handshake has
    /// settled which transport the peer speaks.
    func layer(over carrier: Duplex) throws -> (stream: TLSStream, handshake: Handshake) {
        let stream: TLSStream
        do {
            stream = try TLSStream(over: carrier, context: context)
        } catch {
            carrier.close(reset: true)
            throw error
        }
        let role = self.role
        return (stream, { channel in try await Self.handshake(stream, over: channel, role: role, checksPeer: false) })
    }

    func wrap(_ fd: Int32) throws -> (stream: Duplex, handshake: Handshake) {
        let stream: TLSStream
        do {
            switch role {
            case .server, .pskClient: stream = try TLSStream(fd: fd, context: context)
            case .certificateClient(let serverName, _): stream = try TLSStream(fd: fd, context: context, serverName: serverName)
            }
        } catch {
            Posix.close(fd)
            throw error
        }
        let role = self.role
        return (stream, { channel in try await Self.handshake(stream, over: channel, role: role, checksPeer: true) })
    }

    private static func handshake(_ stream: TLSStream, over channel: AsyncDuplex, role: Role, checksPeer: Bool) async throws {
        // Until the peer's first bytes arrive, each step looks at them before OpenSSL
        // reads them: a frame there comes from an end on `--transport plain`.
        var peerChecked = !checksPeer
        do {
            while true {
                if !peerChecked, let head = TransportMismatch.peek(stream.fd), !head.isEmpty {
                    peerChecked = true
                    try refusePlain(head, on: stream.fd, role: role)
                }
                if try stream.handshakeStep() == .done { break }
                try await channel.waitForReadiness()
            }
        } catch let e as TLSError where e.isRejection {
            if case .certificateClient(let name, _) = role, let why = stream.localVerifyFailure() {
                // Our check of the server's certificate failed, not the server.
                let checked = name.map { " for the name '\($0)'" } ?? ""
                throw FatalClientError(message: "authentication failed: the server's certificate did not verify\(checked): \(why); "
                    + "give --ca FILE with the CA that signed it (and connect by a name the certificate holds), or pin it with --fingerprint sha256:HEX")
            }
            guard case .server = role else {
                throw FatalClientError(message: "authentication failed: the server rejected the TLS handshake (\(e.message)); check the token, --ca or --fingerprint")
            }
            throw e
        }
        switch role {
        case .server, .certificateClient(_, nil):
            break
        case .pskClient:
            guard stream.usedPSK else {
                throw FatalClientError(message: "authentication failed: the server presented a certificate instead of using the token; give --ca FILE or --fingerprint sha256:HEX to verify it")
            }
        case .certificateClient(_, let pinned?):
            guard let actual = stream.peerFingerprint(), TunnelCrypto.constantTimeEqual(actual, pinned) else {
                throw FatalClientError(message: "authentication failed: server certificate fingerprint does not match --fingerprint")
            }
        }
    }

    /// Stops the handshake when the peer's first bytes are a frame: a plain client's hello
    /// (answered with a plain refusal), or a plain or ws server's refusal of our ClientHello;
    /// or an HTTP request: a ws:// client's upgrade (closed unanswered).
    private static func refusePlain(_ head: [UInt8], on fd: Int32, role: Role) throws {
        if case .server = role {
            if TransportMismatch.isHTTPRequest(head) { throw TransportMismatch.refuseWebSocket(fd, serverTransport: "tls") }
            guard TransportMismatch.isFrame(head, of: TunnelProtocol.Hello.self) else { return }
            throw TransportMismatch.refuse(fd, .clientSpeaksPlain)
        }
        guard TransportMismatch.isFrame(head, of: TunnelProtocol.ServerHandshake.self) else { return }
        let webSocket = TransportMismatch.peekedRefusalFromWebSocketServer(fd)
        throw FatalClientError(message: webSocket ? TransportMismatch.serverUsesWebSocket : TransportMismatch.serverUsesPlain)
    }
}
