import Reactor

/// A stream with a keepalive in its layers (a WebSocket's pings). The keepalive's timer
/// belongs to one loop and touches the stream, so it runs only while the stream stays on
/// that loop: the owner that finally holds the stream starts it on its own loop, and an
/// owner that hands the stream to another loop stops it first.
public protocol LayerKeepalive: AnyObject {
    /// Starts the keepalive on `loop`, the caller's; a peer that stops answering gets its
    /// connection shut down, which the owner sees as the stream's end. No-op when the
    /// layer has no interval or the keepalive runs already.
    func startLayerKeepalive(on loop: EventLoop)
    /// Stops it before the stream leaves the loop.
    func stopLayerKeepalive()
}

extension TLSStream: LayerKeepalive {
    public func startLayerKeepalive(on loop: EventLoop) {
        (carrier as? LayerKeepalive)?.startLayerKeepalive(on: loop)
    }

    public func stopLayerKeepalive() {
        (carrier as? LayerKeepalive)?.stopLayerKeepalive()
    }
}
