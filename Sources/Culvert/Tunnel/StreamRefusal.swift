import Reactor
import Transfer

/// How the server ends a stream it will not serve, an exit stream (`ServerExit`) or a
/// `-R proxy:` relay stream (`ReverseDatagrams`): the `ExitStatus` answer, then `eof`,
/// and the close once the client has closed its side, at most `closingWait` later.
/// Closing at once would reset the stream, and a reset may overtake the answer in the
/// client's stream.
enum StreamRefusal {
    /// Answers `stream` with `status` and `reason` and ends it, in a task of its own.
    /// Runs on `loop`, the stream's.
    static func answer(_ stream: MuxStream, _ status: TunnelProtocol.ExitStatus, _ reason: String, on loop: EventLoop) {
        guard let channel = try? AsyncDuplex(loop: loop, duplex: stream) else { return stream.close(reset: true) }
        Task(executorPreference: loop.tasks) { await end(channel, stream, status, reason, on: loop) }
    }

    /// The same for a stream already read and written through `channel`; returns once it
    /// is closed.
    static func end(_ channel: AsyncDuplex, _ stream: MuxStream, _ status: TunnelProtocol.ExitStatus, _ reason: String,
                    on loop: EventLoop) async {
        channel.send(TunnelProtocol.encodeExitReply(status, reason: reason))
        let deadline = loop.schedule(after: closingWait) { channel.fail(.timedOut("refused stream")) }
        do {
            try await channel.flush()
            _ = stream.shutdownWrite()
            while true { _ = try await channel.read(max: 4096) }
        } catch {
            deadline.cancel()
            channel.close()
        }
    }

    /// How long a refused stream waits for the client to close its side.
    private static let closingWait: Duration = .seconds(5)
}
