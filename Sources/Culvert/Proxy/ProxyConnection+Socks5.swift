import Transfer

/// The SOCKS5 handshake (RFC 1928, RFC 1929): greeting, optional username/password,
/// request, reply.
extension ProxyConnection {
    /// Messages of the handshake are at most 515 bytes (a request with a 255-byte name).
    private static let messageLimit = 1024

    func runSocks5() async throws -> Bool {
        let methods: [UInt8]
        switch try await client.read(limit: Self.messageLimit, Socks5.parseGreeting) {
        case .incomplete: return false
        case .invalid(_, let why):
            context.refused("bad_greeting", "proxy handshake failed", peer, ["error": "\(why)"])
            await answerAndClose(Socks5.methodChoice(.noAcceptable))
            return false
        case .done(let offered, let n):
            client.take(n)
            methods = offered
        }
        let wanted: Socks5.Method = context.config.credentials == nil ? .none : .usernamePassword
        guard methods.contains(wanted.rawValue) else {
            context.refused("no_method", "proxy client refused", peer,
                            ["error": "client offers none of the methods culvert accepts (\(wanted == .none ? "no authentication" : "username/password"))"])
            await answerAndClose(Socks5.methodChoice(.noAcceptable))
            return false
        }
        client.channel.send(Socks5.methodChoice(wanted))
        if let credentials = context.config.credentials {
            switch try await client.read(limit: Self.messageLimit, Socks5.parseCredentials) {
            case .incomplete: return false
            case .invalid(_, let why):
                context.refused("bad_auth", "proxy handshake failed", peer, ["error": "\(why)"])
                await answerAndClose(Socks5.authStatus(ok: false))
                return false
            case .done(let given, let n):
                client.take(n)
                guard credentials.check(user: given.user, password: given.password) else {
                    context.refused("bad_auth", "proxy client refused: wrong user or password", peer,
                                    ["user": "\(String(decoding: given.user, as: UTF8.self))"])
                    await answerAndClose(Socks5.authStatus(ok: false))
                    return false
                }
                client.channel.send(Socks5.authStatus(ok: true))
            }
        }
        let request: Socks5.Request
        switch try await client.read(limit: Self.messageLimit, Socks5.parseRequest) {
        case .incomplete: return false
        case .invalid(let reply, let why):
            context.refused("bad_request", "proxy request refused", peer, ["error": "\(why)"])
            await answerAndClose(Socks5.reply(reply))
            return false
        case .done(let parsed, let n):
            client.take(n)
            request = parsed
        }
        switch request.command {
        case .bind:
            context.refused("unsupported_command", "proxy request refused", peer,
                            ["error": "SOCKS5 command \(request.command) is not supported", "destination": "\(request.destination)"])
            await answerAndClose(Socks5.reply(.commandNotSupported))
            return false
        case .udpAssociate:
            return await runAssociation(request)
        case .connect:
            break
        }
        try await client.channel.flush()
        disarm()
        switch await open(request.destination) {
        case .failure(let failure):
            await answerAndClose(Socks5.reply(failure.socksReply))
            return false
        case .success(let upstream):
            client.channel.send(Socks5.reply(.succeeded, bound: upstream.local))
            do {
                try await client.channel.flush()
            } catch {
                upstream.stream.close(reset: true)
                throw error
            }
            return await relay(to: upstream, destination: request.destination)
        }
    }
}
