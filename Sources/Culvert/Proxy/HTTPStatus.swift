/// The statuses culvert's HTTP proxy answers with itself, each sent with a short text
/// body that says why, and closing the connection.
public enum HTTPStatus: Int, Sendable {
    case ok = 200
    case badRequest = 400
    case forbidden = 403
    case methodNotAllowed = 405
    case proxyAuthenticationRequired = 407
    case headersTooLarge = 431
    case badGateway = 502
    case gatewayTimeout = 504
    case versionNotSupported = 505

    public var reason: String {
        switch self {
        case .ok: return "Connection established"
        case .badRequest: return "Bad Request"
        case .forbidden: return "Forbidden"
        case .methodNotAllowed: return "Method Not Allowed"
        case .proxyAuthenticationRequired: return "Proxy Authentication Required"
        case .headersTooLarge: return "Request Header Fields Too Large"
        case .badGateway: return "Bad Gateway"
        case .gatewayTimeout: return "Gateway Timeout"
        case .versionNotSupported: return "HTTP Version Not Supported"
        }
    }

    /// The whole response: status line, `extra` headers, and `body` as text/plain,
    /// with `Connection: close` (culvert closes after its own error answers).
    public func response(body: String, extra: [(String, String)] = []) -> [UInt8] {
        let text = body + "\n"
        var head = "HTTP/1.1 \(rawValue) \(reason)\r\n"
        for (name, value) in extra { head += "\(name): \(value)\r\n" }
        head += "Content-Type: text/plain; charset=utf-8\r\nContent-Length: \(text.utf8.count)\r\nConnection: close\r\n\r\n"
        return Array((head + text).utf8)
    }

    /// The answer to a CONNECT that now tunnels: no body, the connection stays open.
    public static let established: [UInt8] = Array("HTTP/1.1 200 Connection established\r\n\r\n".utf8)

    /// The interim answer to `Expect: 100-continue`: the client sends its body now.
    public static let continueBody: [UInt8] = Array("HTTP/1.1 100 Continue\r\n\r\n".utf8)
}
