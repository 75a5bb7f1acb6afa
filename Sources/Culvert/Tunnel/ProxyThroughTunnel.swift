import Logging
import Reactor
import Synchronization
import Transfer

/// The client's proxies through the tunnel, shared by its loops:
/// - `-D [BIND:]PORT` (`dynamic`): proxies on this host whose connections leave at the
///   server. Each request becomes an exit stream on a carrier (`TunnelExit`); a
///   connection accepted before a carrier is up waits for one (`park`), at most the
///   connect timeout. A UDP ASSOCIATE gets its relay socket here and a UDP exit stream
///   (`TunnelDatagramExit`) that carries its datagrams to the server.
/// - `-R proxy:` (`reverse`): the server relays its visitors' bytes to this client like a
///   TCP service's, and the client runs the proxy on them with a `LocalExit` under its
///   `--exit-allow`/`--exit-deny`. The handshake runs here, where the auth file and the
///   exit are, so the server never sees credentials. A UDP ASSOCIATE gets its relay
///   socket on the server (a relay stream, `ReverseRelayOpener`) and sends from here.
///
/// Thread confinement: `loops` and `workers` are set once by `TunnelClient.start` before
/// any loop runs client code; the exit state and the parked connections are behind a
/// mutex; everything else is immutable.
final class ClientProxies: @unchecked Sendable {
    /// What the server said to `useExit`.
    enum ExitAnswer {
        case unknown
        case accepted
        case refused(String)
    }

    /// A `-D` connection accepted while no carrier was up.
    private struct Parked {
        let id: UInt64
        let fd: Int32
        let peer: SocketAddress?
        let accepted: Int
    }

    private struct State {
        var answer = ExitAnswer.unknown
        var refusalLogged = false
        var parked: [Parked] = []
        var nextID: UInt64 = 0
    }

    let reverse: ProxyContext?
    private(set) var dynamic: ProxyContext?
    var loops: [ClientLoop] = []
    /// The `-D` proxy's worker on each loop, index for index with `loops`.
    var workers: [ProxyWorker] = []
    private let state = Mutex(State())
    private let logger: Logger
    private let connectTimeout: Duration
    /// The most `-D` connections waiting for a carrier; more are served at once (and
    /// answered "not connected").
    private static let parkedMax = 256

    /// - Parameter loopCount: the loops of the group, for the `-D` proxy's datagram batches.
    init(config: TunnelClientConfig, logger: Logger, loop: EventLoop, loopCount: Int) {
        self.logger = logger
        connectTimeout = config.connectTimeout
        // A proxied connection holds a socket and a stream; a quarter of what is free,
        // as `culvert proxy` takes.
        let max = Swift.max(1, UDPSessionBudget.freeDescriptors() / 4)
        func settings(listen: HostPort) -> ProxyConfig {
            var c = ProxyConfig(listen: listen)
            c.credentials = config.proxyCredentials
            c.connectTimeout = config.connectTimeout
            c.handshakeTimeout = config.handshakeTimeout
            return c
        }
        if config.services.contains(where: { $0.kind == .proxy }) {
            var c = settings(listen: HostPort(host: nil, port: 0))
            c.policy = ProxyPolicy(allow: config.exitAllow, deny: config.exitDeny)
            let resolver = CachingResolver()
            // A UDP association's relay socket is on the server (`ServerRelays`); its
            // destinations' sockets are here.
            let udp = ProxyUDP(exit: LocalDatagramExit(policy: c.policy, resolver: resolver, maxSockets: ServerExit.socketsPerAssociation,
                                                       batches: DatagramBatches(loops: loopCount)),
                               batches: DatagramBatches(loops: loopCount), idleTimeout: c.udpIdleTimeout,
                               maxAssociations: Swift.max(1, Swift.min(UDPSessionBudget.ceiling, UDPSessionBudget.freeDescriptors() / 8)))
            reverse = ProxyContext(config: c, exit: LocalExit(policy: c.policy, resolver: resolver, connectTimeout: c.connectTimeout),
                                   logger: logger, refusals: RefusalSummary(logger: logger, message: "reverse proxy requests refused", loop: loop),
                                   maxConnections: max, udp: udp)
        } else {
            reverse = nil
        }
        if let first = config.dynamic.first {
            let c = settings(listen: first)
            // An association holds its relay socket here; its destinations' sockets are at the exit.
            let udp = ProxyUDP(exit: TunnelDatagramExit(proxies: self, logger: logger), batches: DatagramBatches(loops: loopCount),
                               idleTimeout: c.udpIdleTimeout,
                               maxAssociations: Swift.max(1, Swift.min(UDPSessionBudget.ceiling, UDPSessionBudget.freeDescriptors() / 8)))
            dynamic = ProxyContext(config: c, exit: TunnelExit(proxies: self), logger: logger,
                                   refusals: RefusalSummary(logger: logger, message: "proxy requests refused", loop: loop),
                                   maxConnections: max, udp: udp)
        }
    }

    // MARK: -D listeners

    /// Binds every `-D` address (one SO_REUSEPORT socket per loop) and starts accepting;
    /// returns the addresses bound, for the ready lines. Runs on the main loop, after
    /// `loops` is set.
    func startDynamic(_ listen: [HostPort], group: LoopGroup) async throws -> [SocketAddress] {
        guard let dynamic else { return [] }
        // The -D connections count in the client's metrics as one service named by its addresses.
        let name = listen.map(\.description).joined(separator: ",")
        workers = loops.map { ProxyWorker(loop: $0.loop, context: dynamic, meter: $0.meters.service(name, kind: "tcp")) }
        var bound: [SocketAddress] = []
        var perLoop: [[LoopListeners.Listener]] = Array(repeating: [], count: loops.count)
        do {
            for spec in listen {
                let addresses = try await Resolver.resolve(host: spec.host, port: spec.port, passive: true, on: group.main)
                let listeners = try LoopListeners.bind(addresses, loops: loops.count, spec: spec) { (a) throws(SystemError) in
                    try Net.listen(a, reusePort: true)
                }
                bound += listeners.bound
                for (i, mine) in listeners.perLoop.enumerated() { perLoop[i] += mine }
            }
        } catch {
            for listeners in perLoop { for l in listeners { Posix.close(l.fd) } }
            throw error
        }
        for (index, mine) in perLoop.enumerated() {
            let home = loops[index]
            let listeners = Listeners(loop: home.loop, logger: logger)
            home.run { [self] in
                do {
                    try listeners.start(mine) { [unowned self] fd, peer in accepted(fd, peer: peer, on: index) }
                    home.dynamicListeners = listeners
                } catch {
                    logger.error("cannot watch listener", metadata: ["listen": "\(mine.map { "\($0.address)" }.joined(separator: ","))", "error": "\(error)"])
                }
            }
        }
        return bound
    }

    /// A `-D` client on loop `index`: served on a loop with a carrier (this one when it
    /// has one), since its exit stream and its relay must live on the carrier's loop.
    private func accepted(_ fd: Int32, peer: SocketAddress?, on index: Int) {
        let target: Int? = state.withLock { state in
            switch state.answer {
            case .refused:
                return index
            case .accepted where loops[index].hasExitCarrier:
                return index
            case .accepted:
                if let other = loops.indices.first(where: { loops[$0].hasExitCarrier }) { return other }
                fallthrough
            case .unknown:
                guard state.parked.count < Self.parkedMax else { return index }
                state.nextID += 1
                state.parked.append(Parked(id: state.nextID, fd: fd, peer: peer, accepted: index))
                let id = state.nextID
                loops[index].loop.schedule(after: connectTimeout) { [weak self] in self?.parkingExpired(id) }
                return nil
            }
        }
        if let target { serve(fd, peer: peer, on: target) }
    }

    private func serve(_ fd: Int32, peer: SocketAddress?, on index: Int) {
        let worker = workers[index]
        loops[index].run { worker.accepted(fd, peer: peer) }
    }

    /// A parked connection's wait is over: served where it was accepted (its exit then
    /// answers that the tunnel is not connected).
    private func parkingExpired(_ id: UInt64) {
        let gone: Parked? = state.withLock { state in
            guard let i = state.parked.firstIndex(where: { $0.id == id }) else { return nil }
            return state.parked.remove(at: i)
        }
        if let gone { serve(gone.fd, peer: gone.peer, on: gone.accepted) }
    }

    /// Serves the parked connections once the answer is in and, when exits are
    /// accepted, a carrier is up (on loop `carrierLoop`, when one just came up).
    private func releaseParked(carrierLoop: Int?) {
        let (released, target): ([Parked], Int?) = state.withLock { state in
            switch state.answer {
            case .unknown:
                return ([], nil)
            case .refused:
                defer { state.parked.removeAll() }
                return (state.parked, nil)
            case .accepted:
                // The carrier that just came up may be a candidate's: only a serving one takes them.
                let ready = carrierLoop.flatMap { loops[$0].hasExitCarrier ? $0 : nil }
                guard let at = ready ?? loops.indices.first(where: { loops[$0].hasExitCarrier }) else { return ([], nil) }
                defer { state.parked.removeAll() }
                return (state.parked, at)
            }
        }
        for p in released { serve(p.fd, peer: p.peer, on: target ?? p.accepted) }
    }

    // MARK: the server's answer and the carriers

    /// The server answered `useExit` (each session asks again).
    func exitAnswered(_ answer: ExitAnswer) {
        let logRefusal: String? = state.withLock { state in
            state.answer = answer
            guard case .refused(let why) = answer, !state.refusalLogged else { return nil }
            state.refusalLogged = true
            return why
        }
        if let logRefusal {
            logger.error("the server does not allow exits: -D requests are refused (start the server with --allow-exit)",
                         metadata: ["reason": "\(logRefusal)"])
        }
        releaseParked(carrierLoop: nil)
    }

    var exitAnswer: ExitAnswer { state.withLock { $0.answer } }

    /// A carrier came up on `loop`: parked `-D` connections go there.
    func carrierUp(on loop: ClientLoop) {
        guard dynamic != nil, let index = loops.firstIndex(where: { $0 === loop }) else { return }
        releaseParked(carrierLoop: index)
    }

    // MARK: ending

    /// Stops the `-D` listeners and waits for their connections, resetting what is left
    /// at `timeout`. Runs on the main loop.
    func drainDynamic(timeout: Duration, main: EventLoop) async {
        guard !workers.isEmpty else { return }
        let parked = state.withLock { state in
            defer { state.parked.removeAll() }
            return state.parked
        }
        for p in parked { Net.closeWithReset(p.fd) }
        let workers = self.workers
        let loops = self.loops
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            var deadline: LoopTimer?
            let barrier = Barrier(count: workers.count) {
                deadline?.cancel()
                done.resume()
            }
            deadline = main.schedule(after: timeout) {
                for w in workers { w.loop.execute { w.abortAll(.drainTimeout) } }
            }
            for (w, home) in zip(workers, loops) {
                w.loop.execute {
                    home.dynamicListeners?.stop()
                    w.beginDrain { main.execute { barrier.arrive() } }
                }
            }
        }
    }
}

/// The exit of the client's `-D` proxies: an exit stream on a carrier of the calling
/// loop, whose first bytes are the server's answer (`ExitStatus`).
final class TunnelExit: ProxyExit, @unchecked Sendable {
    private unowned let proxies: ClientProxies

    init(proxies: ClientProxies) {
        self.proxies = proxies
    }

    func connect(to destination: ProxyDestination, on loop: EventLoop) async -> Result<ProxyExitStream, ProxyFailure> {
        switch proxies.exitAnswer {
        case .refused: return .failure(.notAllowed)
        case .unknown: return .failure(.general("the tunnel is not connected"))
        case .accepted: break
        }
        guard let home = proxies.loops.first(where: { $0.loop === loop }),
              let stream = home.openExitStream(TunnelProtocol.encodeExitOpen(destination)) else {
            return .failure(.general("the tunnel is not connected"))
        }
        let channel: AsyncDuplex
        do {
            channel = try AsyncDuplex(loop: loop, duplex: stream)
        } catch {
            stream.close(reset: true)
            return .failure(.general("\(error)"))
        }
        do {
            let (status, reason) = try await withTaskCancellationHandler {
                try await TunnelProtocol.readExitReply(from: channel)
            } onCancel: {
                loop.execute { channel.fail(.closed) }
            }
            if let failure = ExitStatusMapping.failure(of: status, reason: reason) {
                channel.close()
                return .failure(failure)
            }
        } catch {
            channel.fail(.closed)
            return .failure(.general("exit stream lost: \(error)"))
        }
        return .success(ProxyExitStream(stream: channel.detach(), remote: nil, local: nil))
    }
}

extension ConfigFile {
    /// A list of `--allow`-style destinations under `key`.
    func rules(_ key: String, _ texts: [String]) throws(ConfigError) -> [ProxyRule] {
        var out: [ProxyRule] = []
        for text in texts {
            do throws(ProxyRule.ParseError) {
                out.append(try ProxyRule.parse(text))
            } catch {
                throw self.error(key, "\(error)")
            }
        }
        return out
    }
}

extension TunnelClientConfig {
    /// Takes the proxy flags over the file's settings and checks them: the auth file is
    /// read; `-D` needs carriers; an unauthenticated proxy on an address others reach
    /// (a `-D` bind that is not loopback, any `-R proxy:` whose bind is not loopback) needs
    /// `--no-auth`.
    mutating func applyProxyFlags(_ flags: TunnelClientFlags) throws(ConfigError) {
        dynamic += flags.dynamic
        if let file = flags.proxyAuthFile { proxyAuthFile = file; proxyNoAuth = false }
        if flags.noAuth { proxyNoAuth = true; proxyAuthFile = nil }
        if !flags.exitAllow.isEmpty { exitAllow = try ProxyRule.parseAll(flags.exitAllow, flag: "--exit-allow") }
        if !flags.exitDeny.isEmpty { exitDeny = try ProxyRule.parseAll(flags.exitDeny, flag: "--exit-deny") }
        if proxyAuthFile != nil && proxyNoAuth {
            throw ConfigError(setting: "--no-auth", "no_auth and proxy_auth_file contradict each other: give one")
        }
        do {
            proxyCredentials = try proxyAuthFile.map { (path) throws(ConfigError) in try ProxyCredentials.load(path) }
        } catch {
            throw ConfigError(setting: "--proxy-auth-file", error.description.replacingOccurrences(of: "--auth-file", with: "--proxy-auth-file"))
        }
        if !dynamic.isEmpty && mux == 0 {
            throw ConfigError(setting: "-D", "-D needs multiplexed data channels: drop --mux 0 (or give --mux 1 or more)")
        }
        guard proxyCredentials == nil && !proxyNoAuth else { return }
        if let open = dynamic.first(where: { !ProxyConfig.isLoopback($0.host) }) {
            throw ConfigError(setting: "--no-auth",
                "refusing to run an unauthenticated proxy on -D \(open), which is not a loopback address: "
                + "give --proxy-auth-file FILE, or --no-auth to run it open on purpose")
        }
        if let open = services.first(where: { $0.kind == .proxy && !ProxyConfig.isLoopback($0.bindHost) }) {
            throw ConfigError(setting: "--no-auth",
                "refusing to expose an unauthenticated proxy with -R \(open.name) on \(open.bindHost ?? "the server's default address"), "
                + "which is not a loopback address: give --proxy-auth-file FILE, or --no-auth to expose it open on purpose")
        }
    }
}
