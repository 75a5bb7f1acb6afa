"""Shared pieces of the `culvert proxy` tests: the running proxy (its fixture `proxy` is in
conftest), an HTTP origin to reach through it, and the UDP ASSOCIATE echo exchange (local
and through the tunnel)."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import struct
import threading

from conftest import Culvert, parse_addr

READY_RE = re.compile(r"^listening proxy (\S+)$")


class ProxyProc(Culvert):
    """A running `culvert proxy`, past its ready line."""

    def __init__(self, path: str, args: list[str]):
        super().__init__(path, ["proxy", *args])
        self.address = parse_addr(self.wait_stdout(READY_RE)[0].group(1))


class Origin(http.server.ThreadingHTTPServer):
    """A threaded HTTP origin on `host` (port chosen by the kernel) answering with
    `handler` until close(); each test file says what its origin serves."""

    daemon_threads = True

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], host: str = "127.0.0.1"):
        super().__init__((host, 0), handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def close(self):
        self.shutdown()
        self.server_close()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """An origin's request handler base: HTTP/1.1 (keep-alive), and no access log on the
    test's stderr."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass


def recv_up_to(sock: socket.socket, n: int) -> bytes:
    """`n` bytes, or fewer when the proxy closes first: a refusal ends the connection
    after its reply, and the tests assert on whatever came."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return buf
        buf += chunk
    return buf


def udp_echo_exchange(u, target: tuple[str, int], count: int, window: int, big: int) -> None:
    """Through the SOCKS5 UDP socket `u`: `count` numbered datagrams of varied sizes to
    the echo at `target`, `window` in flight at a time, every reply from `target` and
    their SHA-256 equal to what was sent; then one datagram of `big` bytes, echoed whole."""
    sent, got = hashlib.sha256(), {}
    for start in range(0, count, window):
        for i in range(start, min(start + window, count)):
            payload = struct.pack(">I", i) + hashlib.sha256(str(i).encode()).digest() * (1 + i % 40)
            sent.update(payload)
            u.sendto(payload, target)
        while len(got) < min(start + window, count):
            data, source = u.recvfrom(65535)
            assert source == target
            got[struct.unpack(">I", data[:4])[0]] = data
    back = hashlib.sha256()
    for i in range(count):
        back.update(got[i])
    assert back.hexdigest() == sent.hexdigest()
    block = (bytes(range(256)) * (big // 256 + 1))[:big]
    u.sendto(block, target)
    data, _ = u.recvfrom(65535)
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(block).hexdigest()
