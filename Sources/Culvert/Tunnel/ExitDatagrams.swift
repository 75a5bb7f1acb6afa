import Logging
import Reactor
import Transfer

/// UDP exit streams: one exit stream carries the datagrams of one SOCKS5 UDP
/// association of a `-D` proxy. Its open payload is the single kind byte
/// `datagramsKind` (a byte no address type uses, so a server that predates it refuses
/// the stream as malformed). The exit answers with an `ExitStatus` as for a TCP exit
/// stream; after `connected` both sides send frames: u32 length, then the SOCKS5 UDP
/// header (RFC 1928 §7: RSV 0 0, FRAG 0, ATYP, address, port), then the payload. From
/// the client the address is the destination (a name is resolved at the exit); from
/// the exit it is the source of a reply.
extension TunnelProtocol {
    static let datagramsKind: UInt8 = 0x10
    /// The longest frame body: the longest header (a 255-byte name) and a full datagram.
    static let maxDatagramFrame = 4 + 256 + 2 + 65535
    /// Frames queued on one association's stream beyond this many bytes are dropped, as
    /// a congested network would.
    static let datagramQueueLimit = 4 << 20

    static func isDatagramsOpen(_ payload: UnsafeRawBufferPointer) -> Bool {
        payload.count == 1 && payload[0] == datagramsKind
    }

    /// One frame: `header` (a SOCKS5 UDP header) and `payload`, after their length.
    static func datagramFrame(header: [UInt8], _ payload: UnsafeRawBufferPointer) -> [UInt8] {
        let length = header.count + payload.count
        var out: [UInt8] = []
        out.reserveCapacity(4 + length)
        out += [UInt8(length >> 24 & 0xFF), UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF)]
        out += header
        out += payload
        return out
    }

    /// Reads the next frame's body off `channel`.
    static func readDatagramFrame(from channel: AsyncDuplex) async throws -> [UInt8] {
        let head = try await channel.readExactly(4)
        let length = Int(head[0]) << 24 | Int(head[1]) << 16 | Int(head[2]) << 8 | Int(head[3])
        guard length >= 10, length <= maxDatagramFrame else {
            throw ChannelError.protocolViolation("datagram frame of \(length) bytes on an exit stream")
        }
        return try await channel.readExactly(length)
    }
}

extension Socks5 {
    /// The header of a datagram to `destination` (names as SOCKS5 writes them: u8 length).
    static func datagramHeader(destination: ProxyDestination) -> [UInt8] {
        switch destination {
        case .address(let address):
            return datagramHeader(source: address)
        case .name(let host, let port):
            let name = Array(host.utf8.prefix(255))
            return [0, 0, 0, 3, UInt8(name.count)] + name + [UInt8(port >> 8), UInt8(port & 0xFF)]
        }
    }
}

/// The datagram exit of the client's `-D` proxies: each association gets a UDP exit
/// stream on a carrier of its loop, and the server sends its datagrams from there.
final class TunnelDatagramExit: DatagramExit, @unchecked Sendable {
    private unowned let proxies: ClientProxies
    private let logger: Logger

    init(proxies: ClientProxies, logger: Logger) {
        self.proxies = proxies
        self.logger = logger
    }

    var unavailable: ProxyFailure? {
        switch proxies.exitAnswer {
        case .refused: return .notAllowed
        case .unknown: return .general("the tunnel is not connected")
        case .accepted: return nil
        }
    }

    func openRoute(on loop: EventLoop, reply: @escaping (SocketAddress, UnsafeRawBufferPointer) -> Void,
                   drop: @escaping (DatagramDrop) -> Void) -> DatagramRoute {
        var stream: MuxStream?
        if case .accepted = proxies.exitAnswer, let home = proxies.loops.first(where: { $0.loop === loop }) {
            stream = home.openExitStream([TunnelProtocol.datagramsKind])
        }
        return TunnelDatagramRoute(loop: loop, stream: stream, logger: logger, reply: reply, drop: drop)
    }
}

/// One association's exit stream, seen from the client.
///
/// Thread confinement: every method runs on `loop`.
private final class TunnelDatagramRoute: DatagramRoute {
    private let loop: EventLoop
    private let channel: AsyncDuplex?
    private let reply: (SocketAddress, UnsafeRawBufferPointer) -> Void
    private let drop: (DatagramDrop) -> Void
    /// Why datagrams go nowhere any more (the exit refused, the stream ended); nil while
    /// they go.
    private var ended: DatagramDrop?
    private var closed = false

    init(loop: EventLoop, stream: MuxStream?, logger: Logger,
         reply: @escaping (SocketAddress, UnsafeRawBufferPointer) -> Void, drop: @escaping (DatagramDrop) -> Void) {
        self.loop = loop
        self.reply = reply
        self.drop = drop
        guard let stream else {
            channel = nil
            ended = .unreachable
            return
        }
        guard let channel = try? AsyncDuplex(loop: loop, duplex: stream, sendLimit: TunnelProtocol.datagramQueueLimit * 2) else {
            stream.close(reset: true)
            self.channel = nil
            ended = .unreachable
            return
        }
        self.channel = channel
        Task(executorPreference: loop.tasks) { [weak self] in
            do {
                let (status, reason) = try await TunnelProtocol.readExitReply(from: channel)
                guard status == .connected else {
                    self?.end(status == .notAllowed || status == .exitsDisabled ? .denied : .unreachable)
                    return logger.warning("the exit refused a UDP association", metadata: ["reason": "\(reason)"])
                }
                while true {
                    let frame = try await TunnelProtocol.readDatagramFrame(from: channel)
                    guard let self else { return }
                    self.deliver(frame)
                }
            } catch ChannelError.closed {
                // The association ended here first.
            } catch {
                self?.end(.unreachable)
                logger.warning("UDP exit stream ended", metadata: [
                    "error": "\(error)",
                    "hint": "a server older than UDP exit streams resets them: upgrade it for UDP ASSOCIATE through -D"])
            }
        }
    }

    private func deliver(_ frame: [UInt8]) {
        guard !closed else { return }
        frame.withUnsafeBytes { raw in
            guard let header = Socks5.parseDatagramHeader(raw), case .address(let source) = header.destination else {
                return drop(.malformed)
            }
            reply(source, UnsafeRawBufferPointer(rebasing: raw[header.length...]))
        }
    }

    private func end(_ reason: DatagramDrop) {
        guard ended == nil else { return }
        ended = reason
        channel?.close()
    }

    func send(_ payload: UnsafeRawBufferPointer, to destination: ProxyDestination) {
        loop.assertInLoop()
        if let ended { return drop(ended) }
        guard let channel else { return drop(.unreachable) }
        guard channel.queuedOutput < TunnelProtocol.datagramQueueLimit else { return drop(.full) }
        channel.send(TunnelProtocol.datagramFrame(header: Socks5.datagramHeader(destination: destination), payload))
    }

    func close() {
        loop.assertInLoop()
        guard !closed else { return }
        closed = true
        ended = ended ?? .unreachable
        channel?.close()
    }
}
