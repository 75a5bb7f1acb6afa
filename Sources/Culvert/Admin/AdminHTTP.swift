/// An admin request as far as the endpoint reads it: the request line and the one
/// header it uses. Bodies are never read (every endpoint is a GET).
struct AdminRequest: Equatable {
    let method: String
    /// The path without its query string.
    let path: String
    /// The `Authorization` header's value, if any.
    let authorization: String?

    /// What a read so far holds.
    enum Head: Equatable {
        /// The blank line that ends the head has not arrived yet.
        case incomplete
        case request(AdminRequest)
        case malformed(String)
    }

    /// Parses the head at the start of `bytes` (CRLF or bare LF line ends).
    static func parse(_ bytes: [UInt8]) -> Head {
        guard let end = headEnd(bytes) else { return .incomplete }
        // Split on bytes: as Characters, "\r\n" is one grapheme and never equals "\n".
        var lines: [String] = []
        for raw in bytes[..<end].split(separator: 10, omittingEmptySubsequences: false) {
            guard let line = String(validating: raw.last == 13 ? raw.dropLast() : raw, as: UTF8.self) else {
                return .malformed("request head is not UTF-8")
            }
            lines.append(line)
        }
        let words = lines.removeFirst().split(separator: " ", omittingEmptySubsequences: true)
        guard words.count == 3, words[2].hasPrefix("HTTP/1.") else { return .malformed("expected METHOD PATH HTTP/1.x") }
        var authorization: String?
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { continue }
            if line[..<colon].lowercased() == "authorization" {
                authorization = String(line[line.index(after: colon)...]).trimmingWhitespace()
            }
        }
        let target = words[1]
        let path = target.firstIndex(of: "?").map { target[..<$0] } ?? target
        return .request(AdminRequest(method: String(words[0]), path: String(path), authorization: authorization))
    }

    /// The index just past the head's last line: the first empty line.
    private static func headEnd(_ bytes: [UInt8]) -> Int? {
        var i = 0
        while i < bytes.count {
            if bytes[i] == 10 {
                if i + 1 < bytes.count && bytes[i + 1] == 10 { return i }
                if i + 2 < bytes.count && bytes[i + 1] == 13 && bytes[i + 2] == 10 { return i }
            }
            i += 1
        }
        return nil
    }
}

/// An admin response: always complete, always followed by closing the connection.
struct AdminResponse: Equatable {
    let status: Int
    let contentType: String
    let body: String
    var headers: [(String, String)] = []

    init(status: Int, contentType: String = "text/plain; charset=utf-8", body: String, headers: [(String, String)] = []) {
        self.status = status
        self.contentType = contentType
        self.body = body
        self.headers = headers
    }

    static func == (a: AdminResponse, b: AdminResponse) -> Bool {
        a.status == b.status && a.contentType == b.contentType && a.body == b.body && a.headers.elementsEqual(b.headers, by: ==)
    }

    static func text(_ status: Int, _ body: String, headers: [(String, String)] = []) -> AdminResponse {
        AdminResponse(status: status, body: body + "\n", headers: headers)
    }

    private var reason: String {
        switch status {
        case 200: return "OK"
        case 400: return "Bad Request"
        case 401: return "Unauthorized"
        case 404: return "Not Found"
        case 405: return "Method Not Allowed"
        case 408: return "Request Timeout"
        case 431: return "Request Header Fields Too Large"
        default: return "Error"
        }
    }

    var bytes: [UInt8] {
        let body = Array(self.body.utf8)
        var head = "HTTP/1.1 \(status) \(reason)\r\nContent-Type: \(contentType)\r\nContent-Length: \(body.count)\r\n"
        for (name, value) in headers { head += "\(name): \(value)\r\n" }
        head += "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        return Array(head.utf8) + body
    }
}
