#if canImport(Glibc)
import Glibc
#endif
import Reactor
import Transfer

/// Why an exit could not open the stream a request asked for, with the answer each
/// front end gives for it: a SOCKS5 reply code (RFC 1928 §6) or an HTTP status.
public enum ProxyFailure: Error, Equatable, Sendable, CustomStringConvertible {
    /// The policy (`--allow`/`--deny`) refuses the destination.
    case notAllowed
    case networkUnreachable
    case hostUnreachable
    /// The name does not resolve (its reason).
    case nameNotFound(String)
    case connectionRefused
    /// Connecting or resolving took longer than allowed.
    case timedOut
    /// Anything else (the resolver's queue full, out of descriptors): its reason.
    case general(String)

    /// The failure of a connect attempt, by errno.
    public init(connect error: SystemError?) {
        switch error?.errno {
        case ECONNREFUSED?: self = .connectionRefused
        case ENETUNREACH?, ENETDOWN?: self = .networkUnreachable
        case EHOSTUNREACH?, EHOSTDOWN?: self = .hostUnreachable
        case ETIMEDOUT?: self = .timedOut
        case let other?: self = .general(SystemError("connect", errno: other).description)
        case nil: self = .general("no address to connect to")
        }
    }

    public var socksReply: Socks5.Reply {
        switch self {
        case .notAllowed: return .notAllowed
        case .networkUnreachable: return .networkUnreachable
        case .hostUnreachable, .nameNotFound: return .hostUnreachable
        case .connectionRefused: return .connectionRefused
        case .timedOut: return .ttlExpired
        case .general: return .generalFailure
        }
    }

    public var httpStatus: HTTPStatus {
        switch self {
        case .notAllowed: return .forbidden
        case .timedOut: return .gatewayTimeout
        case .networkUnreachable, .hostUnreachable, .nameNotFound, .connectionRefused, .general: return .badGateway
        }
    }

    /// The reason in a log line's `reason` key.
    public var label: String {
        switch self {
        case .notAllowed: return "denied"
        case .networkUnreachable: return "network_unreachable"
        case .hostUnreachable: return "host_unreachable"
        case .nameNotFound: return "name_not_found"
        case .connectionRefused: return "refused"
        case .timedOut: return "timed_out"
        case .general: return "failed"
        }
    }

    public var description: String {
        switch self {
        case .notAllowed: return "destination not allowed by policy"
        case .networkUnreachable: return "network unreachable"
        case .hostUnreachable: return "host unreachable"
        case .nameNotFound(let why): return "cannot resolve: \(why)"
        case .connectionRefused: return "connection refused"
        case .timedOut: return "timed out"
        case .general(let why): return why
        }
    }
}
