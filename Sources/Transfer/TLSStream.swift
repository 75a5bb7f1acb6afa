#if canImport(Glibc)
import Glibc
#endif
import CCulvert
import CCulvertTLS
import COpenSSL
import Reactor

/// A TLS failure with OpenSSL's reason text.
public struct TLSError: Error, CustomStringConvertible, Sendable {
    public let message: String
    /// True when the peer answered with a TLS alert (it spoke TLS and refused us), as
    /// opposed to the connection failing underneath.
    public let isRejection: Bool
    /// True when the peer closed the connection cleanly (a FIN, no alert) before the
    /// handshake ended: someone who left, not a fault.
    public let isPeerClose: Bool
    public var description: String { message }

    public init(message: String, isRejection: Bool, isPeerClose: Bool = false) {
        self.message = message
        self.isRejection = isRejection
        self.isPeerClose = isPeerClose
    }

    /// The queued OpenSSL error; a rejection only when the peer sent an alert or its
    /// certificate failed verification (a connection cut mid-handshake is not one).
    static func last(_ context: String) -> TLSError {
        var buf = [CChar](repeating: 0, count: 256)
        var refused: Int32 = 0
        var peerClosed: Int32 = 0
        culvert_tls_last_error(&buf, buf.count, &refused, &peerClosed)
        let detail = String(cString: buf)
        return TLSError(message: detail.isEmpty ? context : "\(context): \(detail)", isRejection: refused != 0,
                        isPeerClose: peerClosed != 0)
    }
}

/// An OpenSSL context (TLS 1.3 only), shared by every connection of one role.
public final class TLSContext: @unchecked Sendable {
    let ctx: OpaquePointer
    public let isServer: Bool

    private init(_ ctx: OpaquePointer?, isServer: Bool, what: String) throws(TLSError) {
        guard let ctx else { throw TLSError.last(what) }
        self.ctx = ctx
        self.isServer = isServer
    }

    deinit { SSL_CTX_free(ctx) }

    /// External-PSK contexts: no certificates, (EC)DHE for forward secrecy.
    public static func psk(key: [UInt8], server: Bool) throws(TLSError) -> TLSContext {
        let ctx = server ? culvert_tls_server_psk(key, key.count) : culvert_tls_client_psk(key, key.count)
        return try TLSContext(ctx, isServer: server, what: "cannot set up TLS with a pre-shared key")
    }

    public static func server(certificate: String, key: String) throws(TLSError) -> TLSContext {
        try TLSContext(culvert_tls_server_cert(certificate, key), isServer: true,
                       what: "cannot load certificate '\(certificate)' and key '\(key)'")
    }

    /// A client context that verifies the server against `caFile`, or (nil) verifies
    /// nothing during the handshake because the caller pins a fingerprint afterwards.
    public static func client(caFile: String?) throws(TLSError) -> TLSContext {
        try TLSContext(culvert_tls_client_cert(caFile), isServer: false,
                       what: caFile.map { "cannot load CA file '\($0)'" } ?? "cannot set up TLS")
    }

    /// A client context that verifies the server against the system's CA store (wss://
    /// to a public endpoint).
    public static func clientWithSystemCAs() throws(TLSError) -> TLSContext {
        let context = try TLSContext(culvert_tls_client_cert(nil), isServer: false, what: "cannot set up TLS")
        guard SSL_CTX_set_default_verify_paths(context.ctx) == 1 else { throw TLSError.last("cannot load the system CA store") }
        SSL_CTX_set_verify(context.ctx, SSL_VERIFY_PEER, nil)
        return context
    }

    /// SHA-256 over the DER of the first certificate in a PEM file.
    public static func fingerprint(ofCertificateFile path: String) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: 32)
        return culvert_tls_file_fingerprint(path, &out) == 0 ? out : nil
    }
}

/// TLS over a non-blocking TCP socket, or inside another stream on one (`init(over:)`),
/// as a `Duplex`: the buffered copier moves its plaintext. Half-close sends close_notify and then FIN; TLS 1.3 lets the other
/// direction go on.
///
/// Records collect in a write buffer and leave with one send(2) per write call (up to
/// `batch` bytes of plaintext), not one per 16 KiB record. Write contract, as for
/// `ZlibStream`: a write whose records the socket did not take at once answers
/// `wouldBlock` and holds them; the caller calls again with the same bytes once
/// writable, and that call reports them written as soon as the records are out.
public final class TLSStream: Duplex {
    public let fd: Int32
    private let ssl: OpaquePointer
    public var readReady = true
    public var writeReady = true
    private var isClosed = false
    /// Plaintext bytes encrypted into the write buffer but not yet reported written.
    private var held = 0
    /// Plaintext encrypted per write call at most.
    private static let batch = 64 * 1024
    /// The stream the records travel in when it is not the socket itself.
    let carrier: Duplex?
    /// Received carrier bytes on their way into OpenSSL's read buffer.
    private var carrierInput: UnsafeMutableRawPointer?

    /// What the handshake needs next.
    public enum HandshakeStep { case done, wantRead, wantWrite }

    /// - Parameter serverName: sent as SNI and, with a CA-verifying context, checked
    ///   against the certificate.
    public init(fd: Int32, context: TLSContext, serverName: String? = nil) throws(TLSError) {
        guard let ssl = SSL_new(context.ctx) else { throw TLSError.last("SSL_new") }
        self.ssl = ssl
        self.fd = fd
        carrier = nil
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        SSL_set_fd(ssl, fd)
        try setUp(context: context, serverName: serverName)
    }

    /// TLS inside another stream (the tunnel's inner layer in a WebSocket): records go
    /// out through `carrier`'s writes and come in through its reads. The stream owns the
    /// carrier from here on and closes it.
    public init(over carrier: Duplex, context: TLSContext, serverName: String? = nil) throws(TLSError) {
        guard let ssl = SSL_new(context.ctx) else { throw TLSError.last("SSL_new") }
        self.ssl = ssl
        fd = carrier.fd
        self.carrier = carrier
        guard culvert_tls_use_read_buffer(ssl) == 0 else {
            SSL_free(ssl)
            throw TLSError.last("cannot set up the TLS read buffer")
        }
        try setUp(context: context, serverName: serverName)
    }

    private func setUp(context: TLSContext, serverName: String?) throws(TLSError) {
        guard culvert_tls_use_write_buffer(ssl) == 0 else {
            SSL_free(ssl)
            throw TLSError.last("cannot set up the TLS write buffer")
        }
        if context.isServer {
            SSL_set_accept_state(ssl)
        } else {
            SSL_set_connect_state(ssl)
            if let serverName {
                if SocketAddress(numericHost: serverName, port: 0) == nil {
                    _ = serverName.withCString { SSL_ctrl(ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, Int(TLSEXT_NAMETYPE_host_name), UnsafeMutableRawPointer(mutating: $0)) }
                }
                _ = SSL_set1_host(ssl, serverName)
            }
        }
    }

    deinit {
        SSL_free(ssl)
        carrierInput?.deallocate()
        if !isClosed {
            if let carrier { carrier.close(reset: true) } else { Posix.close(fd) }
        }
    }

    /// Sends the buffered records: 1 all out, 0 would block, -1 failed (errno set).
    private func sendRecords() -> Int32 {
        guard let carrier else { return culvert_tls_flush(ssl, fd) }
        while true {
            var data: UnsafePointer<UInt8>?
            let count = culvert_tls_output(ssl, &data)
            guard count > 0, let data else { return 1 }
            switch carrier.write(from: data, count: count) {
            case .bytes(let n): culvert_tls_consume(ssl, n)
            case .wouldBlock: return 0
            case .eof:
                errno = EPIPE
                return -1
            case .failed(let e):
                errno = e.errno
                return -1
            }
        }
    }

    /// Moves what the carrier has received into OpenSSL's read buffer: nil when bytes
    /// came (OpenSSL may go on), else why none did.
    private func receiveRecords(from carrier: Duplex) -> IOResult? {
        let capacity = 64 * 1024
        let input = carrierInput ?? UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
        carrierInput = input
        switch carrier.read(into: input, count: capacity) {
        case .bytes(let n):
            guard culvert_tls_feed(ssl, input, n) == 0 else { return .failed(SystemError("BIO_write", errno: ENOMEM)) }
            return nil
        case let other:
            return other
        }
    }

    public var isSpliceable: Bool { false }

    public func handshakeStep() throws(TLSError) -> HandshakeStep {
        while true {
            let step = try handshakeOnce()
            guard step == .wantRead, let carrier else { return step }
            switch receiveRecords(from: carrier) {
            case nil: continue
            case .wouldBlock?: return .wantRead
            case .failed(let e)?: throw TLSError(message: "TLS handshake: \(e)", isRejection: false)
            case .eof?, .bytes?: throw TLSError(message: "TLS handshake: connection closed by peer", isRejection: false, isPeerClose: true)
            }
        }
    }

    private func handshakeOnce() throws(TLSError) -> HandshakeStep {
        ERR_clear_error()
        let rc = SSL_do_handshake(ssl)
        let error = rc == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl, rc)
        if error == SSL_ERROR_NONE || error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE {
            switch sendRecords() {
            case 1: break
            case 0: return .wantWrite
            default:
                throw TLSError(message: "TLS handshake: \(SystemError("send", errno: errno))", isRejection: false)
            }
        }
        if rc == 1 { return .done }
        let failure: TLSError
        switch error {
        case SSL_ERROR_WANT_READ: return .wantRead
        case SSL_ERROR_WANT_WRITE: return .wantWrite
        case SSL_ERROR_SYSCALL:
            let e = errno
            failure = TLSError(message: e == 0 ? "TLS handshake: connection closed by peer" : "TLS handshake: \(SystemError("recv", errno: e))",
                               isRejection: false, isPeerClose: e == 0)
        default:
            failure = TLSError.last("TLS handshake failed")
        }
        // A failed handshake may have queued an alert for the peer: send it if we can,
        // once errno and OpenSSL's error queue are read (a carrier's write changes them).
        _ = sendRecords()
        throw failure
    }

    /// Whether the finished handshake authenticated with the external PSK. A PSK client
    /// must check this: a server with a certificate ignores the PSK, and nothing would
    /// have verified that certificate.
    public var usedPSK: Bool { culvert_tls_used_psk(ssl) == 1 }

    /// Why this end did not accept the peer's certificate (OpenSSL's verify result), or
    /// nil when it did or did not check one: tells our own refusal from the peer's.
    public func localVerifyFailure() -> String? {
        let result = SSL_get_verify_result(ssl)
        guard result != Int(X509_V_OK) else { return nil }
        return String(cString: X509_verify_cert_error_string(result))
    }

    /// SHA-256 of the peer's certificate, once the handshake is done.
    public func peerFingerprint() -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: 32)
        return culvert_tls_peer_fingerprint(ssl, &out) == 0 ? out : nil
    }

    /// `count` bytes of keying material exported under `label` with an empty context
    /// (RFC 8446 section 7.5), once a TLS 1.3 handshake is done: equal at both ends only
    /// when they share this TLS session, so a proof over it binds a secret to this
    /// connection end to end (channel binding, RFC 9266). Nil before the handshake, on
    /// failure, and below TLS 1.3, whose exporter RFC 9266 does not trust for binding.
    public func keyingMaterial(label: String, count: Int = 32) -> [UInt8]? {
        guard SSL_version(ssl) == TLS1_3_VERSION else { return nil }
        var out = [UInt8](repeating: 0, count: count)
        let context: [UInt8] = []
        let ok = label.withCString { SSL_export_keying_material(ssl, &out, count, $0, strlen($0), context, 0, 1) }
        return ok == 1 ? out : nil
    }

    /// Reads as many records as are already buffered (read-ahead) into `buffer`, so the
    /// copier writes 64 KiB at a time rather than one 16 KiB record.
    public func read(into buffer: UnsafeMutableRawPointer, count: Int) -> IOResult {
        ERR_clear_error()
        var total = 0
        var n = 0
        while SSL_read_ex(ssl, buffer, count, &n) != 1 {
            let error = SSL_get_error(ssl, 0)
            if error == SSL_ERROR_WANT_READ, let carrier {
                if let r = receiveRecords(from: carrier) { return r }
                ERR_clear_error()
                continue
            }
            let failure = result(of: error, call: "SSL_read")
            // A failed read may have queued an alert for the peer; sent after the failure
            // is read off errno and OpenSSL's error queue, which a carrier's write changes.
            if error != SSL_ERROR_WANT_READ && held == 0 { _ = sendRecords() }
            return failure
        }
        total = n
        while total < count && SSL_has_pending(ssl) == 1 {
            guard SSL_read_ex(ssl, buffer + total, count - total, &n) == 1 else {
                ERR_clear_error()
                break
            }
            total += n
        }
        // Reading may have produced records to send (a key update's answer).
        if held == 0 && culvert_tls_pending_output(ssl) > 0 { _ = sendRecords() }
        return .bytes(total)
    }

    public func write(from buffer: UnsafeRawPointer, count: Int) -> IOResult {
        if held > 0 || culvert_tls_pending_output(ssl) > 0 {
            switch sendRecords() {
            case 1: break
            case 0: return .wouldBlock
            default: return .failed(SystemError("send", errno: errno))
            }
            if held > 0 {
                defer { held = 0 }
                return .bytes(held)
            }
        }
        ERR_clear_error()
        var total = 0
        let limit = min(count, Self.batch)
        while total < limit {
            var n = 0
            guard SSL_write_ex(ssl, buffer + total, limit - total, &n) == 1 else {
                if total > 0 {
                    ERR_clear_error()
                    break
                }
                return result(of: SSL_get_error(ssl, 0), call: "SSL_write")
            }
            total += n
        }
        switch sendRecords() {
        case 1: return .bytes(total)
        case 0:
            held = total
            return .wouldBlock
        default: return .failed(SystemError("send", errno: errno))
        }
    }

    /// Encrypts header and body into the write buffer (two records at least: the header
    /// gets one of its own rather than a copy of the body behind it) and sends what the
    /// socket takes. Not while a write waits to be reported (`held`): its bytes go first.
    public func writeThrough(header: UnsafeRawPointer, _ headerCount: Int, body: UnsafeRawPointer,
                             _ bodyCount: Int) -> IOResult? {
        guard held == 0 else { return nil }
        ERR_clear_error()
        for (part, count) in [(header, headerCount), (body, bodyCount)] {
            var total = 0
            while total < count {
                var n = 0
                // Into memory: only a broken connection makes this fail.
                guard SSL_write_ex(ssl, part + total, count - total, &n) == 1 else {
                    return .failed(Self.protocolFailure("SSL_write"))
                }
                total += n
            }
        }
        if sendRecords() < 0 { return .failed(SystemError("send", errno: errno)) }
        return .bytes(headerCount + bodyCount)
    }

    public var bufferedOutput: Int { held == 0 ? Int(culvert_tls_pending_output(ssl)) + (carrier?.bufferedOutput ?? 0) : 0 }

    public func flushBuffered() -> IOResult {
        switch sendRecords() {
        case 1: return carrier?.flushBuffered() ?? .bytes(0)
        case 0: return .wouldBlock
        default: return .failed(SystemError("send", errno: errno))
        }
    }

    private func result(of error: Int32, call: String) -> IOResult {
        switch error {
        case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE: return .wouldBlock
        case SSL_ERROR_ZERO_RETURN: return .eof
        case SSL_ERROR_SYSCALL:
            let e = errno
            return e == 0 ? .eof : .failed(SystemError(call, errno: e))
        default:
            return .failed(Self.protocolFailure(call))
        }
    }

    /// A TLS-level failure (SSL_ERROR_SSL) as EPROTO with OpenSSL's reason in it, so the
    /// log tells a peer gone without close_notify ("unexpected eof while reading") from a
    /// record that failed to decrypt ("decryption failed or bad record mac") or an alert
    /// the peer sent ("sslv3 alert bad record mac"). Clears OpenSSL's error queue.
    private static func protocolFailure(_ call: String) -> SystemError {
        let code = ERR_get_error()
        ERR_clear_error()
        guard code != 0, let reason = ERR_reason_error_string(code) else { return SystemError(call, errno: EPROTO) }
        return SystemError("\(call): \(String(cString: reason))", errno: EPROTO)
    }

    public func shutdownWrite() -> SystemError? {
        ERR_clear_error()
        _ = SSL_shutdown(ssl)
        // Inside a carrier the carrier half-closes its own way (a WebSocket's close
        // frame), with close_notify in the same send. A FIN under it would end more than
        // our direction: nginx ends an upgraded connection on the first FIN from either
        // side, cutting off the answer.
        if let carrier = carrier as? HalfClosingCarrier {
            var data: UnsafePointer<UInt8>?
            let count = culvert_tls_output(ssl, &data)
            let error = carrier.shutdownWrite(after: UnsafeRawBufferPointer(start: data, count: count))
            culvert_tls_consume(ssl, count)
            return error
        }
        // Best effort: every earlier write is out already (see the write contract), so
        // only the close_notify record can be left when the socket is full.
        _ = sendRecords()
        if let carrier { return carrier.shutdownWrite() }
        return Net.shutdownWrite(fd)
    }

    public func close(reset: Bool) {
        guard !isClosed else { return }
        isClosed = true
        if reset {
            if let carrier { carrier.close(reset: true) } else { Net.closeWithReset(fd) }
        } else {
            // An orderly end says so (close_notify), best effort on a non-blocking socket.
            ERR_clear_error()
            _ = SSL_shutdown(ssl)
            ERR_clear_error()
            if let carrier = carrier as? HalfClosingCarrier {
                // Into the carrier's queue with its close frame, which its close flushes
                // even when the socket is full right now.
                var data: UnsafePointer<UInt8>?
                let count = culvert_tls_output(ssl, &data)
                _ = carrier.shutdownWrite(after: UnsafeRawBufferPointer(start: data, count: count))
                culvert_tls_consume(ssl, count)
            } else {
                _ = sendRecords()
            }
            if let carrier { carrier.close(reset: false) } else { Posix.close(fd) }
        }
    }
}
