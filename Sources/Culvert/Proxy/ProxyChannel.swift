import Reactor
import Transfer

/// A connection in the proxy's control phase (a client's handshake, or either side of a
/// forwarded HTTP exchange): an `AsyncDuplex` plus the bytes read but not yet used, so
/// a parser can look at a whole message and leave what follows for the next one.
///
/// Thread confinement: used from tasks on `channel.loop`.
final class ProxyChannel {
    let channel: AsyncDuplex
    /// Received bytes not yet consumed.
    private(set) var pending: [UInt8] = []

    init(_ channel: AsyncDuplex) {
        self.channel = channel
    }

    convenience init(loop: EventLoop, stream: Duplex) throws(SystemError) {
        self.init(try AsyncDuplex(loop: loop, duplex: stream))
    }

    /// Reads what the peer has sent (at least one byte) onto `pending`.
    func fill() async throws {
        pending += try await channel.read(max: 16 * 1024)
    }

    /// Drops the first `count` pending bytes and returns them.
    @discardableResult
    func take(_ count: Int) -> [UInt8] {
        let out = Array(pending[..<count])
        pending.removeSubrange(..<count)
        return out
    }

    /// Parses with `parse` until it has a message, reading more while it is incomplete;
    /// at most `limit` bytes are buffered for one message. A peer that stops sending in
    /// the middle of a message (half-closes) gets a general failure.
    func read<M>(limit: Int, _ parse: ([UInt8]) -> Socks5.Parse<M>) async throws -> Socks5.Parse<M> {
        while true {
            let result = parse(pending)
            guard case .incomplete = result else { return result }
            guard pending.count < limit else { return .invalid(.generalFailure, "message longer than \(limit) bytes") }
            do {
                try await fill()
            } catch ChannelError.eof where !pending.isEmpty {
                return .invalid(.generalFailure, "truncated message (\(pending.count) bytes, then the client stopped sending)")
            }
        }
    }

    /// What reading a head found.
    enum HeadRead {
        case head(HTTPHead)
        /// The peer closed before sending a byte of a new head (a kept-alive connection's end).
        case closed
        case tooLarge
        case malformed(String)
        /// A request line of an HTTP version other than 1.0 and 1.1.
        case unsupportedVersion(String)
    }

    /// Reads one HTTP head of at most `limit` bytes.
    func readHead(limit: Int, response: Bool = false) async throws -> HeadRead {
        var scanned = 0
        while true {
            switch HTTPHead.scan(pending, from: scanned, limit: limit) {
            case .complete(let n):
                do throws(HTTPHead.Malformed) {
                    let head = try HTTPHead.parse(pending[..<n], as: response ? .response : .request)
                    take(n)
                    return .head(head)
                } catch {
                    if let version = error.unsupportedVersion { return .unsupportedVersion(version) }
                    return .malformed(error.reason)
                }
            case .tooLarge:
                return .tooLarge
            case .incomplete:
                scanned = pending.count
                do {
                    try await fill()
                } catch ChannelError.eof {
                    return pending.isEmpty ? .closed : .malformed("truncated head (\(pending.count) bytes, then the peer stopped sending)")
                }
            }
        }
    }

    /// Sends `bytes` and waits until the socket took them (the backpressure of a body copy).
    func write(_ bytes: [UInt8]) async throws {
        channel.send(bytes)
        try await channel.flush()
    }

    /// Copies one message body, framed as `body`, from this channel to `destination`;
    /// `progress` runs after each piece (the caller's idle deadline). Returns the bytes copied.
    @discardableResult
    func copyBody(_ body: HTTPBody, to destination: ProxyChannel, progress: () -> Void) async throws -> Int {
        var copied = 0
        switch body {
        case .none:
            break
        case .length(let total):
            while copied < total {
                if pending.isEmpty { try await fill() }
                let n = min(total - copied, pending.count)
                try await destination.write(take(n))
                progress()
                copied += n
            }
        case .chunked:
            var scanner = ChunkedScanner()
            while !scanner.isDone {
                if pending.isEmpty { try await fill() }
                let n = try scanner.feed(pending[...])
                try await destination.write(take(n))
                progress()
                copied += n
            }
        case .untilClose:
            while true {
                if !pending.isEmpty {
                    copied += pending.count
                    try await destination.write(take(pending.count))
                    progress()
                }
                do {
                    try await fill()
                } catch ChannelError.eof {
                    break
                }
            }
        }
        return copied
    }

    /// Hands the connection over (to a relay) with what is still pending; nothing may be
    /// waiting to be sent.
    func detach() -> (stream: Duplex, pending: [UInt8]) {
        let bytes = pending
        pending = []
        return (channel.detach(), bytes)
    }
}
