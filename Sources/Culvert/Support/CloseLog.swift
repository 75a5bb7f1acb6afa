import Logging
import Transfer

extension Logger {
    /// The one line every relayed connection ends with: who, where to, bytes each way,
    /// how long, and why it ended. `extra` adds fields (e.g. bytes on the wire).
    /// Nothing is formatted when info lines are off.
    func connectionClosed(peer: @autoclosure () -> String, _ endpointKey: String, _ endpoint: @autoclosure () -> String,
                          relay: CopyBidirectional, reason: CloseReason, extra: Logger.Metadata = [:]) {
        guard logLevel <= .info else { return }
        var metadata: Logger.Metadata = [
            "peer": "\(peer())", endpointKey: "\(endpoint())",
            "up": .stringConvertible(relay.bytesAToB), "down": .stringConvertible(relay.bytesBToA),
            "duration": .stringConvertible(LoggedSeconds(nanoseconds: relay.loop.now &- relay.startedAt)),
            "reason": "\(reason.label)",
        ]
        if case .reset(let e) = reason { metadata["error"] = "\(e)" }
        metadata.merge(extra) { _, new in new }
        info("connection closed", metadata: metadata)
    }
}
