import Logging
import Reactor
import Transfer

/// The data channels of one session: every channel requested from the client (by its
/// one-time nonce), idle dedicated channels, the carriers of multiplexed visitors, and
/// the visitors and UDP services waiting for a channel.
///
/// Every request has a deadline, the handshake timeout: a channel gets as long to arrive
/// as a connection gets to prove itself. A request still open then (refused by the
/// unauthenticated-connection limit, lost on the way, ignored by the client) is
/// forgotten, its nonce refused from then on, and asked again if still needed. So at
/// most the channels needed are asked for at any time, at most once per deadline, and a
/// lost request delays visitors by one deadline instead of stopping the pool for good.
///
/// Channels and carriers are placed on several loops: a dedicated channel stays on the
/// loop that accepted it (the kernel spreads those), and the carriers go to successive
/// loops, the first on the session's own. A visitor is handed to the loop of the channel it
/// rides and relayed there.
///
/// Thread confinement: lives on the session's loop; it reaches a carrier's loop only
/// through `ServerLoop.run`, and carriers report back the same way.
final class ChannelPool {
    /// A visitor (accepted on an exposed port, or a secret service's visitor arriving
    /// through the tunnel) waiting for a data channel.
    private final class Waiter {
        let stream: Duplex
        let peer: String
        let service: ExposedService
        /// When it arrived (the session loop's clock), for the connect duration.
        let arrivedAt: UInt64
        var timer: LoopTimer?
        init(stream: Duplex, peer: String, service: ExposedService, arrivedAt: UInt64) {
            self.stream = stream
            self.peer = peer
            self.service = service
            self.arrivedAt = arrivedAt
        }
    }

    private let home: ServerLoop
    private let context: ServerContext
    private let sessionID: [UInt8]
    private let sessionKey: [UInt8]
    private let peer: String
    private let poolSize: Int
    /// How many carriers take this client's TCP visitors (0: a dedicated channel each).
    private let muxChannels: Int
    /// Sends a frame on the session's control channel.
    private let send: ([UInt8]) -> Void
    /// Nonces sent in openData and not used yet, each opening exactly one data channel,
    /// with the timer that forgets it at its deadline.
    private var outstanding: [TunnelProtocol.Key16: LoopTimer] = [:]
    /// Requests forgotten since the last summary line, and the timer that writes it.
    private var expiredUnreported = 0
    private var expiryReport: LoopTimer?
    /// How often at most a summary of expired requests is written, per session.
    private static let reportInterval: Duration = .seconds(1)
    private var idle: [(stream: Duplex, home: ServerLoop)] = []
    private var waiting: [Waiter] = []
    /// TCP visitors waiting for a carrier (only while none is up).
    private var muxWaiting: [Waiter] = []
    private var udpWaiting: [(ExposedService, ServerUDPService)] = []
    private var carriers: [Carrier] = []
    /// Carriers being started on their loop.
    private var carriersStarting = 0
    private var carriersPlaced = 0
    private var nextCarrier = 0
    /// Serving; saying goodbye (the client is about to close every channel and carrier,
    /// which is no loss to report or replace); or ended.
    private enum Phase { case serving, leaving, ended }
    private var phase = Phase.serving
    private var ended: Bool { phase == .ended }
    private var loop: EventLoop { home.loop }
    private var logger: Logger { context.logger }
    /// How long a requested channel may take to arrive.
    private var requestDeadline: Duration { context.config.handshakeTimeout }

    init(home: ServerLoop, context: ServerContext, sessionID: [UInt8], sessionKey: [UInt8], peer: String,
         poolSize: Int, muxChannels: Int, send: @escaping ([UInt8]) -> Void) {
        self.home = home
        self.context = context
        self.sessionID = sessionID
        self.sessionKey = sessionKey
        self.peer = peer
        self.poolSize = poolSize
        self.muxChannels = muxChannels
        self.send = send
    }

    /// Asks the client for enough channels to cover the pool, the carriers and every
    /// waiting visitor and UDP service.
    func requestChannels() {
        loop.assertInLoop()
        guard case .serving = phase else { return }
        let carriersWanted = max(0, muxChannels - carriers.count - carriersStarting)
        while idle.count + outstanding.count < poolSize + waiting.count + udpWaiting.count + carriersWanted {
            let nonce = TunnelCrypto.random(TunnelProtocol.channelNonceSize)
            let key = TunnelProtocol.Key16(nonce)
            outstanding[key] = loop.schedule(after: requestDeadline) { [weak self] in self?.requestExpired(key) }
            send(TunnelProtocol.encode(.openData(channelNonce: nonce)))
        }
    }

    /// The client did not bring this request's channel in time: forget the nonce and
    /// ask again if the channel is still needed.
    private func requestExpired(_ key: TunnelProtocol.Key16) {
        guard !ended, outstanding.removeValue(forKey: key) != nil else { return }
        expiredUnreported += 1
        // Requests sent together expire together: one line for the lot.
        if expiryReport == nil {
            expiryReport = loop.schedule(after: Self.reportInterval) { [weak self] in self?.reportExpired() }
        }
        requestChannels()
    }

    private func reportExpired() {
        expiryReport = nil
        guard expiredUnreported > 0 else { return }
        logger.warning("data channel requests expired", metadata: [
            "peer": "\(peer)", "count": .stringConvertible(expiredUnreported),
            "deadline": .seconds(requestDeadline),
        ])
        expiredUnreported = 0
    }

    /// Checks a data channel's one-time proof and uses up its nonce (false for a nonce
    /// never sent, used or expired).
    func accept(nonce: [UInt8], proof: [UInt8]) -> Bool {
        loop.assertInLoop()
        let key = TunnelProtocol.Key16(nonce)
        guard !ended, let deadline = outstanding[key] else { return false }
        let expected = TunnelProtocol.dataProof(sessionKey: sessionKey, sessionID: sessionID, channelNonce: nonce)
        guard TunnelCrypto.constantTimeEqual(proof, expected) else { return false }
        deadline.cancel()
        outstanding[key] = nil
        return true
    }

    /// A proven channel (detached, on no loop yet) that `channelHome` accepted.
    func channelArrived(_ stream: Duplex, home channelHome: ServerLoop) {
        loop.assertInLoop()
        guard !ended else { return stream.close(reset: false) }
        if carriers.count + carriersStarting < muxChannels {
            startCarrier(stream)
        } else if !udpWaiting.isEmpty {
            let (service, udp) = udpWaiting.removeFirst()
            attachUDP(service, udp, stream)
        } else if waiting.isEmpty {
            // A channel asked for a visitor who has gone meanwhile (timed out, or served
            // by another channel) is surplus beyond the pool: closed cleanly, so the
            // client knows it was not a failure.
            guard idle.count < poolSize else { return stream.close(reset: false) }
            idle.append((stream, channelHome))
        } else {
            let visitor = waiting.removeFirst()
            visitor.timer?.cancel()
            pair(stream, on: channelHome, visitor.stream, peer: visitor.peer, service: visitor.service, arrivedAt: visitor.arrivedAt)
        }
    }

    func visitorArrived(_ stream: Duplex, peer visitor: String, service: ExposedService) {
        loop.assertInLoop()
        guard !ended else { return stream.close(reset: true) }
        let arrivedAt = loop.now
        if muxChannels > 0, case .tcp = service.kind {
            if let carrier = pickCarrier() {
                return openStream(on: carrier, stream, peer: visitor, service: service, arrivedAt: arrivedAt)
            }
            muxWaiting.append(makeWaiter(stream, peer: visitor, service: service, arrivedAt: arrivedAt))
            return requestChannels()
        }
        if let (channel, channelHome) = idle.popLast() {
            pair(channel, on: channelHome, stream, peer: visitor, service: service, arrivedAt: arrivedAt)
        } else {
            waiting.append(makeWaiter(stream, peer: visitor, service: service, arrivedAt: arrivedAt))
        }
        requestChannels()
    }

    func udpNeedsChannel(_ service: ExposedService, _ udp: ServerUDPService) {
        loop.assertInLoop()
        guard !ended, !service.isRetired else { return }
        if let (channel, _) = idle.popLast() {
            attachUDP(service, udp, channel)
        } else {
            udpWaiting.append((service, udp))
        }
        requestChannels()
    }

    // MARK: dedicated channels

    /// Tells the client which service the visitor wants, then relays raw bytes, on the
    /// channel's loop.
    private func pair(_ channel: Duplex, on channelHome: ServerLoop, _ visitor: Duplex, peer: String, service: ExposedService,
                      arrivedAt: UInt64) {
        let frame = TunnelProtocol.encode(.connect(serviceID: service.id, visitor: peer))
        let handoff = Handoff((channel, visitor))
        channelHome.run {
            let (channel, visitor) = handoff.value
            channelHome.startDedicated(channel, frame: frame, visitor: visitor, service: service, peer: peer, arrivedAt: arrivedAt)
        }
    }

    /// Dedicates a data channel to a UDP service's datagrams, on the session's loop
    /// (where the service's sockets are).
    private func attachUDP(_ service: ExposedService, _ udp: ServerUDPService, _ stream: Duplex) {
        let channel: AsyncDuplex
        do {
            channel = try AsyncDuplex(loop: loop, duplex: stream)
        } catch {
            stream.close(reset: true)
            return udpNeedsChannel(service, udp)
        }
        channel.send(TunnelProtocol.encode(.connect(serviceID: service.id, visitor: "udp")))
        Task(executorPreference: loop.tasks) {
            do {
                try await channel.flush()
            } catch {
                return self.udpNeedsChannel(service, udp)
            }
            var data = channel.detach()
            if service.compress {
                guard let z = try? ZlibStream(wrapping: data) else {
                    data.close(reset: true)
                    return self.udpNeedsChannel(service, udp)
                }
                data = z
            }
            guard !self.ended, !service.isRetired else { return data.close(reset: false) }
            udp.attach(data)
        }
        requestChannels()
    }

    // MARK: carriers

    /// Turns a fresh channel into a carrier on the next loop in turn (the session's first).
    private func startCarrier(_ stream: Duplex) {
        carriersStarting += 1
        let carrier = Carrier(home: context.loop(after: home, step: carriersPlaced), peer: peer)
        carriersPlaced += 1
        let session = Handoff(self)
        let sessionLoop = home
        carrier.start(stream,
            onUp: { sessionLoop.run { session.value.carrierUp(carrier) } },
            onFailed: { sessionLoop.run { session.value.carrierFailed() } },
            onClosed: { error in
                let text = error.map { "\($0)" } ?? "closed"
                sessionLoop.run { session.value.carrierClosed(carrier, error: text) }
            })
    }

    private func carrierUp(_ carrier: Carrier) {
        carriersStarting -= 1
        guard !ended else { return carrier.closeWhenIdle() }
        carriers.append(carrier)
        let queued = muxWaiting
        muxWaiting.removeAll()
        for v in queued {
            v.timer?.cancel()
            openStream(on: carrier, v.stream, peer: v.peer, service: v.service, arrivedAt: v.arrivedAt)
        }
    }

    private func carrierFailed() {
        carriersStarting -= 1
        requestChannels()
    }

    private func carrierClosed(_ carrier: Carrier, error: String) {
        guard let i = carriers.firstIndex(where: { $0 === carrier }) else { return }
        carriers.remove(at: i)
        guard case .serving = phase else { return }
        logger.warning("multiplexed data channel lost", metadata: ["peer": "\(peer)", "error": "\(error)"])
        requestChannels()
    }

    /// The carriers in turn; their stream counts live on their own loops.
    private func pickCarrier() -> Carrier? {
        guard !carriers.isEmpty else { return nil }
        nextCarrier = (nextCarrier + 1) % carriers.count
        return carriers[nextCarrier]
    }

    /// Hands the visitor to the carrier's loop. A carrier that closed before the visitor
    /// got there sends it back once, to wait for another (its close report is on the way).
    private func openStream(on carrier: Carrier, _ visitor: Duplex, peer: String, service: ExposedService, arrivedAt: UInt64,
                            retry: Bool = true) {
        let payload = TunnelProtocol.encodeOpen(serviceID: service.id, visitor: peer)
        let handoff = Handoff(visitor)
        let carrierHome = carrier.home
        let pool = Handoff(self)
        let sessionLoop = home
        carrierHome.run {
            guard let stream = carrier.open(payload) else {
                guard retry else { return handoff.value.close(reset: true) }
                return sessionLoop.run {
                    pool.value.carrierGone(carrier, handoff.value, peer: peer, service: service, arrivedAt: arrivedAt)
                }
            }
            carrierHome.startRelay(visitor: handoff.value, data: stream, service: service, peer: peer, arrivedAt: arrivedAt)
        }
    }

    /// A visitor came back from a carrier that had closed: it goes to another carrier
    /// that is up, or waits for the replacement (the carrier's close report, on its way,
    /// removes it and asks for one).
    private func carrierGone(_ carrier: Carrier, _ visitor: Duplex, peer: String, service: ExposedService, arrivedAt: UInt64) {
        guard !ended else { return visitor.close(reset: true) }
        if let other = carriers.first(where: { $0 !== carrier }) {
            return openStream(on: other, visitor, peer: peer, service: service, arrivedAt: arrivedAt, retry: false)
        }
        muxWaiting.append(makeWaiter(visitor, peer: peer, service: service, arrivedAt: arrivedAt))
    }

    // MARK: waiting visitors

    private func makeWaiter(_ stream: Duplex, peer visitor: String, service: ExposedService, arrivedAt: UInt64) -> Waiter {
        let waiter = Waiter(stream: stream, peer: visitor, service: service, arrivedAt: arrivedAt)
        waiter.timer = loop.schedule(after: context.config.visitorTimeout) { [weak self, unowned waiter] in
            self?.visitorTimedOut(waiter)
        }
        return waiter
    }

    private func visitorTimedOut(_ waiter: Waiter) {
        if let i = waiting.firstIndex(where: { $0 === waiter }) {
            waiting.remove(at: i)
        } else if let i = muxWaiting.firstIndex(where: { $0 === waiter }) {
            muxWaiting.remove(at: i)
        } else {
            return
        }
        waiter.stream.close(reset: true)
        guard context.visitorDrops.record("no_data_channel") else { return }
        logger.warning("visitor dropped: no data channel in time", metadata: ["peer": "\(waiter.peer)", "timeout": .seconds(context.config.visitorTimeout)])
    }

    // MARK: ending

    /// The session is saying goodbye: channels and carriers the client closes from now on
    /// end with it.
    func sessionLeaving() {
        loop.assertInLoop()
        if case .serving = phase { phase = .leaving }
    }

    /// Releases idle channels and waiting visitors; carriers close once their last
    /// stream ends (visitors already relayed go on).
    func end() {
        loop.assertInLoop()
        guard !ended else { return }
        phase = .ended
        for (stream, _) in idle { stream.close(reset: false) }
        idle.removeAll()
        for v in waiting + muxWaiting {
            v.timer?.cancel()
            v.stream.close(reset: true)
        }
        waiting.removeAll()
        muxWaiting.removeAll()
        udpWaiting.removeAll()
        for c in carriers { c.closeWhenIdle() }
        carriers.removeAll()
        for deadline in outstanding.values { deadline.cancel() }
        outstanding.removeAll()
        expiryReport?.cancel()
        expiryReport = nil
        reportExpired()
    }
}

/// A data channel carrying multiplexed visitor streams, on the loop the session placed
/// it on; the session holds it, the carrier's own loop drives it.
///
/// Thread confinement: `mux` is touched on `home` only; `start`, `open` and
/// `closeWhenIdle` run there (`closeWhenIdle` gets there by itself).
final class Carrier: @unchecked Sendable {
    let home: ServerLoop
    /// The client's address, for the logs of its exit streams.
    private let peer: String
    private var mux: MuxConnection?

    init(home: ServerLoop, peer: String) {
        self.home = home
        self.peer = peer
    }

    /// Sends the `mux` frame and starts multiplexing, on `home`. Exactly one of
    /// `onUp` and `onFailed` is called; `onClosed` follows `onUp` when the carrier ends.
    func start(_ stream: Duplex, onUp: @escaping @Sendable () -> Void, onFailed: @escaping @Sendable () -> Void,
               onClosed: @escaping @Sendable (Error?) -> Void) {
        let handoff = Handoff(stream)
        home.run { [self] in
            let channel: AsyncDuplex
            do {
                channel = try AsyncDuplex(loop: home.loop, duplex: handoff.value)
            } catch {
                handoff.value.close(reset: true)
                return onFailed()
            }
            channel.send(TunnelProtocol.encode(.mux))
            guard channel.hasPendingOutput else { return begin(channel.detach(), onUp: onUp, onFailed: onFailed, onClosed: onClosed) }
            Task(executorPreference: home.loop.tasks) {
                do {
                    try await channel.flush()
                } catch {
                    channel.close()
                    return onFailed()
                }
                self.begin(channel.detach(), onUp: onUp, onFailed: onFailed, onClosed: onClosed)
            }
        }
    }

    private func begin(_ stream: Duplex, onUp: @escaping () -> Void, onFailed: @escaping () -> Void, onClosed: @escaping (Error?) -> Void) {
        (stream as? LayerKeepalive)?.startLayerKeepalive(on: home.loop)
        let mux = MuxConnection(loop: home.loop, carrier: stream, isOpener: true, pipes: home.relays.resources.pipes)
        // A carrier whose first read fails closes inside start(): that is a failed
        // start, not a carrier that was up.
        var up = false
        var diedStarting = false
        // The client's streams are exit streams (`-D`); the exit answers them, refusing
        // when the server is none.
        mux.acceptsPeerStreams = true
        mux.onOpen = { [home, peer] stream, payload in home.context.exit.streamOpened(stream, payload, peer: peer, on: home) }
        mux.onClose = { _, error in
            if up { onClosed(error) } else { diedStarting = true }
        }
        do {
            try mux.start()
        } catch {
            context.logger.warning("cannot watch a multiplexed data channel", metadata: ["error": "\(error)"])
            return onFailed()
        }
        if diedStarting { return onFailed() }
        up = true
        self.mux = mux
        onUp()
    }

    private var context: ServerContext { home.context }

    /// A new stream for a visitor; nil when the carrier is gone. On `home` only.
    func open(_ payload: [UInt8]) -> MuxStream? {
        home.loop.assertInLoop()
        return mux?.open(payload)
    }

    /// Closes the carrier once its last stream has ended; from any loop.
    func closeWhenIdle() {
        home.run { [self] in mux?.closeWhenIdle() }
    }
}

/// A value handed from one loop to another through an inbox: the sender gives it up, so
/// only the receiving loop touches it from then on.
struct Handoff<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
