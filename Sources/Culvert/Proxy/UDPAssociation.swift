#if canImport(Glibc)
import Glibc
#endif
import Reactor
import Transfer

/// The client's side of a SOCKS5 UDP ASSOCIATE (RFC 1928 §7): the relay socket the
/// reply named, which takes datagrams from the client's address only, strips their SOCKS
/// header and hands them to a `DatagramRoute`, and wraps what comes back with the header
/// of its source. It lives as long as the TCP connection that asked for it; the
/// connection's task ends it.
///
/// Thread confinement: every method runs on `loop`.
final class UDPAssociation: EventHandler {
    /// Which port of the client's address datagrams may come from.
    private enum ClientPort {
        /// The request named none: the first datagram from the client's address sets it.
        case learning
        case known(SocketAddress)
    }

    /// The address the client sends to (the reply's BND.ADDR and BND.PORT).
    let relayAddress: SocketAddress
    private(set) var datagramsUp: UInt64 = 0
    private(set) var bytesUp: UInt64 = 0
    private(set) var datagramsDown: UInt64 = 0
    private(set) var bytesDown: UInt64 = 0
    private(set) var drops: [DatagramDrop: Int] = [:]
    /// When a datagram last passed either way.
    private(set) var lastActivity: UInt64

    private let loop: EventLoop
    private let fd: Int32
    private var registration: Registration?
    private let clientHost: SocketAddress
    private var clientPort: ClientPort
    private let batch: DatagramBatch
    private var route: DatagramRoute?
    private let onDrop: (DatagramDrop) -> Void

    /// - Parameters:
    ///   - local: the proxy's address of the TCP connection: the relay socket binds its host.
    ///   - client: the TCP peer; only its host may send.
    ///   - requested: the request's DST.PORT (0: learn it from the first datagram).
    ///   - onDrop: sees each dropped datagram after it was counted (the caller logs some).
    init(loop: EventLoop, local: SocketAddress, client: SocketAddress, requested port: UInt16,
         exit: DatagramExit, batch: DatagramBatch, onDrop: @escaping (DatagramDrop) -> Void) throws(SystemError) {
        self.loop = loop
        self.onDrop = onDrop
        self.batch = batch
        clientHost = client.withPort(0)
        clientPort = port == 0 ? .learning : .known(client.withPort(port))
        lastActivity = loop.now
        fd = try Net.udpListen(local.withPort(0), reusePort: false, bufferSize: 1 << 20)
        do {
            relayAddress = try Net.localAddress(fd)
            registration = try loop.register(fd: fd, interest: .read, handler: self)
        } catch {
            Posix.close(fd)
            throw error
        }
        route = exit.openRoute(on: loop, reply: { [unowned self] source, payload in
            relayReply(from: source, payload)
        }, drop: { [unowned self] reason in drop(reason) })
    }

    func handleEvents(_ events: UInt32, tag: UInt8) {
        for _ in 0..<8 {
            guard registration != nil else { return }
            let n: Int
            do {
                n = try batch.receive(from: fd)
            } catch {
                return
            }
            for i in 0..<n {
                relayRequest(i)
                if registration == nil { return }
            }
            if n < batch.capacity { return }
        }
        loop.deferTask { [weak self] in self?.handleEvents(0, tag: 0) }
    }

    /// Datagram `i` of the batch, from whoever sent it to the relay socket.
    private func relayRequest(_ i: Int) {
        guard let source = batch.address(i), source.withPort(0) == clientHost else { return drop(.foreign) }
        switch clientPort {
        case .learning:
            clientPort = .known(source)
        case .known(let client):
            guard source == client else { return drop(.foreign) }
        }
        guard !batch.isTruncated(i) else { return drop(.oversized) }
        let datagram = batch.payload(i)
        guard let header = Socks5.parseDatagramHeader(datagram) else { return drop(.malformed) }
        guard header.fragment == 0 else { return drop(.fragment) }
        let payload = UnsafeRawBufferPointer(rebasing: datagram[header.length...])
        datagramsUp += 1
        bytesUp += UInt64(payload.count)
        lastActivity = loop.now
        route?.send(payload, to: header.destination)
    }

    private func relayReply(from source: SocketAddress, _ payload: UnsafeRawBufferPointer) {
        guard case .known(let client) = clientPort else { return drop(.foreign) }
        let header = Socks5.datagramHeader(source: source)
        let outcome: Result<Bool, SystemError> = header.withUnsafeBytes { h in
            Result { () throws(SystemError) -> Bool in try Net.sendDatagram(fd, header: h, payload: payload, to: client) }
        }
        switch outcome {
        case .success(let sent):
            guard sent else { return drop(.full) }
            datagramsDown += 1
            bytesDown += UInt64(payload.count)
            lastActivity = loop.now
        case .failure(let error):
            drop(error.errno == EMSGSIZE ? .oversized : .unreachable)
        }
    }

    private func drop(_ reason: DatagramDrop) {
        drops[reason, default: 0] += 1
        onDrop(reason)
    }

    /// Closes the relay socket and the route.
    func close() {
        loop.assertInLoop()
        guard let registration else { return }
        self.registration = nil
        loop.deregister(fd: fd, registration: registration)
        Posix.close(fd)
        route?.close()
        route = nil
    }
}
