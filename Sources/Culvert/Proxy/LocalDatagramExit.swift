#if canImport(Glibc)
import Glibc
#endif
import Reactor
import Transfer

/// The datagram exit of `culvert proxy`: datagrams leave from this host, on one socket
/// per destination address connected to it (so only that destination's answers come
/// back, and an ICMP unreachable reaches that socket alone), names resolved on the
/// resolver pool and checked by the policy like `LocalExit` does for streams.
final class LocalDatagramExit: DatagramExit {
    private let policy: ProxyPolicy
    private let resolver: CachingResolver
    private let maxSockets: Int
    private let batches: DatagramBatches

    /// - Parameter maxSockets: destinations one association may talk to at once; the
    ///   least recently used socket makes room for a new destination.
    init(policy: ProxyPolicy, resolver: CachingResolver, maxSockets: Int, batches: DatagramBatches) {
        self.policy = policy
        self.resolver = resolver
        self.maxSockets = maxSockets
        self.batches = batches
    }

    func openRoute(on loop: EventLoop, reply: @escaping (SocketAddress, UnsafeRawBufferPointer) -> Void,
                   drop: @escaping (DatagramDrop) -> Void) -> DatagramRoute {
        LocalDatagramRoute(loop: loop, policy: policy, resolver: resolver, maxSockets: maxSockets,
                           batch: batches.batch(for: loop), reply: reply, drop: drop)
    }
}

/// One association's sockets towards its destinations.
///
/// Thread confinement: every method runs on `loop`.
private final class LocalDatagramRoute: DatagramRoute {
    /// A socket connected to one destination.
    final class Outbound: EventHandler {
        let fd: Int32
        let remote: SocketAddress
        var registration: Registration?
        var lastUsed: UInt64
        unowned let route: LocalDatagramRoute

        init(fd: Int32, remote: SocketAddress, now: UInt64, route: LocalDatagramRoute) {
            self.fd = fd
            self.remote = remote
            self.lastUsed = now
            self.route = route
        }

        func handleEvents(_ events: UInt32, tag: UInt8) { route.receive(on: self) }
    }

    /// Lookups one association may have in flight; more datagrams to names are dropped.
    private static let maxLookups = 16
    private static let socketBuffer = 1 << 20

    private let loop: EventLoop
    private let policy: ProxyPolicy
    private let resolver: CachingResolver
    private let maxSockets: Int
    private let batch: DatagramBatch
    private let reply: (SocketAddress, UnsafeRawBufferPointer) -> Void
    private let drop: (DatagramDrop) -> Void
    private var sockets: [SocketAddress: Outbound] = [:]
    private var lookups = 0
    private var closed = false

    init(loop: EventLoop, policy: ProxyPolicy, resolver: CachingResolver, maxSockets: Int, batch: DatagramBatch,
         reply: @escaping (SocketAddress, UnsafeRawBufferPointer) -> Void, drop: @escaping (DatagramDrop) -> Void) {
        self.loop = loop
        self.policy = policy
        self.resolver = resolver
        self.maxSockets = maxSockets
        self.batch = batch
        self.reply = reply
        self.drop = drop
    }

    func send(_ payload: UnsafeRawBufferPointer, to destination: ProxyDestination) {
        loop.assertInLoop()
        switch destination {
        case .address(let address):
            guard policy.admits(address, allowedByName: false) else { return drop(.denied) }
            send(payload, toAddress: address)
        case .name(let host, let port):
            guard case .resolve(let allowedByName) = policy.check(name: host, port: port) else { return drop(.denied) }
            guard lookups < Self.maxLookups else { return drop(.lookups) }
            lookups += 1
            let copy = [UInt8](payload)
            Task(executorPreference: loop.tasks) { [self] in
                let found = await resolver.resolve(host: host, port: port, on: loop)
                lookups -= 1
                guard !closed else { return }
                guard case .success(let addresses) = found else { return drop(.unresolved) }
                guard let address = addresses.first(where: { policy.admits($0, allowedByName: allowedByName) }) else {
                    return drop(.denied)
                }
                copy.withUnsafeBytes { send($0, toAddress: address) }
            }
        }
    }

    private func send(_ payload: UnsafeRawBufferPointer, toAddress address: SocketAddress) {
        guard let socket = sockets[address] ?? open(address) else { return drop(.sockets) }
        socket.lastUsed = loop.now
        do {
            if try !Net.sendDatagram(socket.fd, header: UnsafeRawBufferPointer(start: nil, count: 0), payload: payload, to: nil) {
                drop(.full)
            }
        } catch {
            switch error.errno {
            case EMSGSIZE: drop(.oversized)
            case ECONNREFUSED, EHOSTUNREACH, ENETUNREACH: drop(.unreachable)
            default: drop(.sockets)
            }
        }
    }

    /// A socket to `address`, making room by closing the least recently used one.
    private func open(_ address: SocketAddress) -> Outbound? {
        if sockets.count >= maxSockets, let oldest = sockets.values.min(by: { $0.lastUsed < $1.lastUsed }) {
            release(oldest)
        }
        do throws(SystemError) {
            let fd = try Net.udpConnect(address, bufferSize: Self.socketBuffer)
            let socket = Outbound(fd: fd, remote: address, now: loop.now, route: self)
            do {
                socket.registration = try loop.register(fd: fd, interest: .read, handler: socket)
            } catch {
                Posix.close(fd)
                throw error
            }
            sockets[address] = socket
            return socket
        } catch {
            return nil
        }
    }

    private func receive(on socket: Outbound) {
        // A few batches per wake-up, then the loop's other work gets its turn.
        for _ in 0..<8 {
            guard socket.registration != nil else { return }
            let n: Int
            do {
                n = try batch.receive(from: socket.fd)
            } catch {
                // The destination answered with ICMP unreachable; its socket is of no more use.
                drop(.unreachable)
                return release(socket)
            }
            for i in 0..<n {
                if batch.isTruncated(i) {
                    drop(.oversized)
                } else {
                    reply(batch.address(i) ?? socket.remote, batch.payload(i))
                }
                // The association may have ended while handling a reply.
                if closed { return }
            }
            if n < batch.capacity { return }
        }
        loop.deferTask { [weak self, weak socket] in
            guard let self, let socket, !self.closed else { return }
            self.receive(on: socket)
        }
        socket.lastUsed = loop.now
    }

    private func release(_ socket: Outbound) {
        guard let registration = socket.registration else { return }
        socket.registration = nil
        loop.deregister(fd: socket.fd, registration: registration)
        Posix.close(socket.fd)
        sockets[socket.remote] = nil
    }

    func close() {
        loop.assertInLoop()
        guard !closed else { return }
        closed = true
        for socket in Array(sockets.values) { release(socket) }
    }
}

/// One `DatagramBatch` per loop, made when a loop's first association needs it: the
/// relay and route sockets of every association on that loop share it, as each batch is
/// filled and emptied within one event.
///
/// Thread safety: `batch(for:)` is called on the loop it names, and each loop has a slot of its own.
final class DatagramBatches: Sendable {
    /// One loop's batch, touched on that loop only.
    private final class Slot: @unchecked Sendable {
        var batch: DatagramBatch?
    }

    private let slots: [Slot]

    init(loops: Int) {
        slots = (0..<loops).map { _ in Slot() }
    }

    func batch(for loop: EventLoop) -> DatagramBatch {
        loop.assertInLoop()
        let slot = slots[loop.id]
        if let batch = slot.batch { return batch }
        let batch = DatagramBatch()
        slot.batch = batch
        return batch
    }
}
