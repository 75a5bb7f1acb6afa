import Transfer

/// What the proxy does to a head it forwards, on top of Transfer's `HTTPHead`.
extension HTTPHead {
    /// The head without hop-by-hop fields (RFC 9110 §7.6.1): the fixed ones and those
    /// `Connection` names. `Transfer-Encoding` stays: culvert passes bodies through
    /// unchanged, chunked encoding included.
    func removingHopByHop() -> HTTPHead {
        var drop: Set<String> = ["connection", "keep-alive", "proxy-connection", "proxy-authorization",
                                 "proxy-authenticate", "te", "trailer", "upgrade"]
        drop.formUnion(tokens("Connection").subtracting(["transfer-encoding"]))
        var out = self
        out.fields = fields.filter { !drop.contains($0.name.lowercased()) }
        return out
    }
}
