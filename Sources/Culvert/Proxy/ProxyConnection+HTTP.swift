#if canImport(Glibc)
import Glibc
#endif
import Transfer

/// The HTTP proxy: `CONNECT host:port` becomes a relay; absolute-form requests
/// (`GET http://host/path HTTP/1.1`) are forwarded one by one to the origin, with
/// hop-by-hop fields removed and the client's connection kept alive between them.
extension ProxyConnection {
    func runHTTP() async throws -> Bool {
        defer {
            origin?.channel.channel.close()
            origin = nil
        }
        var first = true
        while true {
            if !first {
                // A drain ends a kept-alive client between two requests, not in one.
                guard !idleClients.draining else {
                    client.channel.close()
                    return false
                }
                arm(config.keepAliveTimeout, "keep-alive wait")
                idleClients.enter(self) { [client] in
                    if client.pending.isEmpty { client.channel.fail(.closed, reset: false) }
                }
            }
            first = false
            let head: HTTPHead
            let read = try await client.readHead(limit: config.maxHeadBytes)
            idleClients.leave(self)
            switch read {
            case .closed:
                client.channel.close()
                return false
            case .tooLarge:
                context.refused("head_too_large", "proxy request refused", peer, ["error": "request head over \(config.maxHeadBytes) bytes"])
                await answerAndClose(HTTPStatus.headersTooLarge.response(body: "request head longer than \(config.maxHeadBytes) bytes"))
                return false
            case .malformed(let why):
                context.refused("bad_request", "proxy request refused", peer, ["error": "\(why)"])
                await answerAndClose(HTTPStatus.badRequest.response(body: "malformed request: \(why)"))
                return false
            case .unsupportedVersion(let version):
                context.refused("unsupported_version", "proxy request refused", peer, ["error": "\(version) is not supported"])
                await answerAndClose(HTTPStatus.versionNotSupported.response(body: "\(version) is not supported: culvert speaks HTTP/1.0 and HTTP/1.1"))
                return false
            case .head(let parsed):
                head = parsed
            }
            disarm()
            if let credentials = config.credentials,
               !head.values("Proxy-Authorization").contains(where: { credentials.check(basic: $0) }) {
                let given = !head.values("Proxy-Authorization").isEmpty
                context.refused(given ? "bad_auth" : "no_auth", "proxy client refused: \(given ? "wrong user or password" : "no credentials")", peer)
                await answerAndClose(HTTPStatus.proxyAuthenticationRequired.response(
                    body: "proxy authentication required", extra: [("Proxy-Authenticate", "Basic realm=\"culvert\"")]))
                return false
            }
            let (method, target, version) = head.startLine
            if method == "CONNECT" {
                guard let destination = HTTPTarget.authority(Substring(target), defaultPort: nil) else {
                    context.refused("bad_request", "proxy request refused", peer, ["error": "CONNECT target '\(target)' is not host:port"])
                    await answerAndClose(HTTPStatus.badRequest.response(body: "CONNECT needs host:port"))
                    return false
                }
                switch await open(destination) {
                case .failure(let failure):
                    await answerAndClose(failure.httpStatus.response(body: "\(destination): \(failure)"))
                    return false
                case .success(let upstream):
                    client.channel.send(HTTPStatus.established)
                    do {
                        try await client.channel.flush()
                    } catch {
                        upstream.stream.close(reset: true)
                        throw error
                    }
                    return await relay(to: upstream, destination: destination)
                }
            }
            guard let (destination, path) = HTTPTarget.absolute(target) else {
                context.refused("bad_request", "proxy request refused", peer, ["error": "target '\(target)' is neither absolute http:// nor CONNECT"])
                await answerAndClose(HTTPStatus.badRequest.response(body: "a proxy request needs an absolute http:// target or CONNECT"))
                return false
            }
            let requestBody: HTTPBody
            do throws(HTTPHead.Malformed) {
                requestBody = try HTTPBody.of(request: head)
            } catch {
                context.refused("bad_request", "proxy request refused", peer, ["error": "\(error)"])
                await answerAndClose(HTTPStatus.badRequest.response(body: "malformed request: \(error)"))
                return false
            }
            let keepClient = wantsKeepAlive(head, version: version) && !idleClients.draining
            var forwarded = head.removingHopByHop()
            forwarded = HTTPHead(startLine: (method, path, version), fields: forwarded.fields)
            if forwarded.values("Host").isEmpty { forwarded.fields.insert(("Host", hostHeader(destination)), at: 0) }
            if !keepClient { forwarded.fields.append(("Connection", "close")) }
            // The body is copied before the response is read, so an origin's 100 Continue
            // would wait behind a body the client holds back for it (curl waits a second,
            // then sends anyway). culvert answers the expectation itself, as soon as the
            // head is on its way, and the origin is not asked (RFC 9110 §10.1.1 lets a
            // proxy do so; 1.0 clients get no 1xx).
            var expectsContinue = requestBody != .none && version == "HTTP/1.1" && head.tokens("Expect").contains("100-continue")
            if expectsContinue { forwarded.fields.removeAll { $0.name.lowercased() == "expect" } }
            // A kept-alive origin connection may have been closed by the origin while it
            // waited; a request that is safe to repeat and got nothing back yet is sent
            // again, once, on a fresh connection.
            let repeatable = (method == "GET" || method == "HEAD") && requestBody == .none
            var retried = false
            var response: ForwardedResponse?
            while response == nil {
                let reused = origin?.destination == destination && origin?.channel.channel.isOpen == true
                if !reused {
                    origin?.channel.channel.close()
                    origin = nil
                    switch await open(destination) {
                    case .failure(let failure):
                        await answerAndClose(failure.httpStatus.response(body: "\(destination): \(failure)"))
                        return false
                    case .success(let upstream):
                        do {
                            origin = (destination, try ProxyChannel(loop: loop, stream: upstream.stream))
                        } catch {
                            upstream.stream.close(reset: true)
                            throw error
                        }
                    }
                }
                guard let upstream = origin?.channel else { return false }
                // From here on, a silence of the keep-alive time on either side ends the exchange.
                let activity = { [self] in arm(config.keepAliveTimeout, "request", also: upstream) }
                activity()
                // The origin's socket failing while the request goes out means nothing came
                // back yet: the client has not been sent a byte of this response.
                var sent = true
                do {
                    try await upstream.write(forwarded.encoded())
                    if expectsContinue {
                        expectsContinue = false
                        try await client.write(HTTPStatus.continueBody)
                    }
                    try await client.copyBody(requestBody, to: upstream, progress: activity)
                } catch ChannelError.io(let error) where !upstream.channel.isOpen && [ECONNRESET, EPIPE].contains(error.errno) {
                    sent = false
                }
                var outcome = ResponseOutcome.originGone
                if sent {
                    outcome = try await forwardResponse(from: upstream, method: method, clientVersion: version,
                                                        keepClient: keepClient, progress: activity)
                }
                switch outcome {
                case .forwarded(let done):
                    response = done
                case .originGone where reused && repeatable && !retried:
                    retried = true
                    origin?.channel.channel.close()
                    origin = nil
                    context.logger.debug("origin closed a kept-alive connection, request sent again",
                                         metadata: ["peer": "\(peer)", "destination": "\(destination)"])
                case .originGone:
                    context.refused("bad_response", "proxy request failed", peer, ["error": "origin closed the connection without a response"])
                    await answerAndClose(HTTPStatus.badGateway.response(body: "the origin closed the connection without a response"))
                    return false
                case .failed:
                    return false
                }
            }
            guard let keep = response else { return false }
            context.logger.info("http request forwarded", metadata: [
                "peer": "\(peer)", "method": "\(method)", "host": "\(destination)",
                "status": .stringConvertible(keep.status), "bytes": .stringConvertible(keep.bytes),
            ])
            disarm()
            if !keep.origin {
                origin?.channel.channel.close()
                origin = nil
            }
            if !keep.client {
                client.channel.close()
                return false
            }
        }
    }

    /// Sends the origin's response to the client (interim 1xx ones first).
    private func forwardResponse(from upstream: ProxyChannel, method: String, clientVersion: String,
                                 keepClient: Bool, progress: () -> Void) async throws -> ResponseOutcome {
        var interim = false
        while true {
            let head: HTTPHead
            let read: ProxyChannel.HeadRead
            do {
                read = try await upstream.readHead(limit: config.maxHeadBytes, response: true)
            } catch ChannelError.io(let error) where !interim && error.errno == ECONNRESET && upstream.pending.isEmpty {
                return .originGone
            } catch {
                read = .malformed("\(error)")
            }
            switch read {
            case .head(let parsed):
                head = parsed
            case .closed where !interim:
                return .originGone
            case .closed, .tooLarge, .malformed, .unsupportedVersion:
                context.refused("bad_response", "proxy request failed", peer, ["error": "origin sent no valid response head"])
                await answerAndClose(HTTPStatus.badGateway.response(body: "the origin sent no valid response"))
                return .failed
            }
            let code = Int(head.startLine.1) ?? 0
            var answer = head.removingHopByHop()
            if (100..<200).contains(code) {
                client.channel.send(answer.encoded())
                interim = true
                continue
            }
            let body: HTTPBody
            do throws(HTTPHead.Malformed) {
                body = try HTTPBody.of(response: head, method: method)
            } catch {
                await answerAndClose(HTTPStatus.badGateway.response(body: "the origin sent a malformed response: \(error)"))
                return .failed
            }
            let originKeeps = body != .untilClose && wantsKeepAlive(head, version: head.startLine.0)
            let keep = keepClient && body != .untilClose
            if !keep {
                answer.fields.append(("Connection", "close"))
            } else if clientVersion == "HTTP/1.0" {
                answer.fields.append(("Connection", "keep-alive"))
            }
            try await client.write(answer.encoded())
            let bytes = try await upstream.copyBody(body, to: client, progress: progress)
            return .forwarded(ForwardedResponse(status: code, bytes: bytes, client: keep, origin: originKeeps))
        }
    }

    /// What forwarding a request's response came to.
    private enum ResponseOutcome {
        case forwarded(ForwardedResponse)
        /// The origin closed or reset before a byte of the response: nothing reached the
        /// client, so the request may be sent again.
        case originGone
        /// The client got a 502 and is closed.
        case failed
    }

    /// A response passed to the client: its status, body bytes, and which connections stay.
    private struct ForwardedResponse {
        let status: Int
        let bytes: Int
        let client: Bool
        let origin: Bool
    }

    /// HTTP/1.1 keeps a connection unless `Connection: close`; 1.0 only with `keep-alive`.
    private func wantsKeepAlive(_ head: HTTPHead, version: String) -> Bool {
        let tokens = head.tokens("Connection").union(head.tokens("Proxy-Connection"))
        return version == "HTTP/1.1" ? !tokens.contains("close") : tokens.contains("keep-alive")
    }

    private func hostHeader(_ destination: ProxyDestination) -> String {
        let port = destination.port == 80 ? "" : ":\(destination.port)"
        switch destination {
        case .address(let a): return (a.family == AF_INET6 ? "[\(a.host)]" : a.host) + port
        case .name(let host, _): return host + port
        }
    }
}
