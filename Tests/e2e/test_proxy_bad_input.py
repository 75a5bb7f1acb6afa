"""End-to-end tests of `culvert proxy` against bad input (issue 14, "Bad input") and of
the HTTP side's keep-alive edges: each bad request gets its reply code or status and one
log line, floods are summarised, a drain ends idle kept-alive clients at once, forwarded
requests are logged, and a request on an origin connection closed meanwhile is retried
when that is safe.

Loopback only; every wait is bounded (ready lines, socket timeouts, polls)."""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time

from conftest import recv_all
from proxy_support import ProxyProc



def exchange(p: ProxyProc, *pieces: bytes, half_close: bool = False) -> bytes:
    """Sends `pieces`, optionally half-closes, and returns all the proxy sent until it closed."""
    with socket.create_connection(p.address, timeout=10) as s:
        for piece in pieces:
            s.sendall(piece)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        try:
            return recv_all(s)
        except ConnectionResetError:
            return b"<reset>"


GREETING = b"\x05\x01\x00"


def socks_request(cmd: int, atyp: int, address: bytes, port: int) -> bytes:
    return bytes([5, cmd, 0, atyp]) + address + struct.pack(">H", port)


class KeepAliveOrigin:
    """A raw HTTP/1.1 origin that answers one request per connection with a keep-alive
    response and then closes the connection without saying so: what a kept-alive
    connection looks like when the origin timed it out."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                if head:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                    # let the proxy take the response before the close arrives
                    time.sleep(0.2)

    def close(self):
        self.sock.close()


# --------------------------------------------------------------------------
# SOCKS5


def test_socks_bad_input_gets_its_reply_code(proxy):
    p = proxy()
    assert exchange(p, b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00") == b"\x00\x5b" + bytes(6)  # SOCKS4
    assert exchange(p, b"\x05\x00") == b"\x05\xff"  # a greeting without methods
    assert exchange(p, GREETING, socks_request(1, 1, socket.inet_aton("127.0.0.1"), 0))[2:4] == b"\x05\x08"  # port 0
    long_name = b".".join([b"a" * 63] * 4)[:255]
    assert exchange(p, GREETING, socks_request(1, 3, bytes([255]) + long_name, 80))[2:4] == b"\x05\x04"  # name > 253
    assert exchange(p, GREETING, socks_request(1, 3, b"\x09bad name!", 80))[2:4] == b"\x05\x04"
    assert exchange(p, GREETING, b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50")[2:4] == b"\x05\x01"  # request version 4
    # truncated: the client stops sending in the middle of its request
    assert exchange(p, GREETING, b"\x05\x01\x00\x01\x7f\x00", half_close=True) == b"\x05\x00" + b"\x05\x01\x00\x01" + bytes(6)
    for reason in ("unsupported_version", "bad_greeting", "bad_request"):
        p.wait_stderr(rf"reason={reason}|{reason}=")  # in full, or counted in the summary line


def test_a_truncated_greeting_is_cut_at_the_handshake_deadline(proxy):
    p = proxy("--handshake-timeout", "300ms")
    with socket.create_connection(p.address, timeout=10) as s:
        s.sendall(b"\x05\x02\x00")
        start = time.monotonic()
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - start < 5
    p.wait_stderr(r"reason=timed_out")


# --------------------------------------------------------------------------
# HTTP


def test_http_bad_input_gets_its_status(proxy):
    p = proxy()
    cases = [
        (b"CONNECT 127.0.0.1:0 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT 127.0.0.1:70000 HTTP/1.1\r\n\r\n", b"400"),
        (b"GET http://127.0.0.1:0/ HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT " + b".".join([b"a" * 63] * 5) + b":80 HTTP/1.1\r\n\r\n", b"400"),  # name > 255 bytes
        (b"CONNECT bad_name!:80 HTTP/1.1\r\n\r\n", b"400"),
        (b"GET http://x/ HTTP/2.0\r\n\r\n", b"505"),
        (b"GET http://x/ HTTP/1.1\r\nBad Header: x\r\n\r\n", b"400"),
    ]
    for request, status in cases:
        reply = exchange(p, request)
        assert reply.startswith(b"HTTP/1.1 " + status), (request[:60], reply[:200])
    # a head that stops in the middle (the client half-closes) is a 400 too
    assert exchange(p, b"GET http://x/ HTTP/1.1\r\nHost: x\r\n", half_close=True).startswith(b"HTTP/1.1 400")
    p.wait_stderr(r"reason=unsupported_version|unsupported_version=1")


def test_header_limit_is_64_kib(proxy):
    origin = KeepAliveOrigin()
    try:
        p = proxy()
        target = f"http://127.0.0.1:{origin.port}/"
        fits = exchange(p, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX: {'a' * 60000}\r\n\r\n".encode())
        assert fits.startswith(b"HTTP/1.1 200") and fits.endswith(b"hello")
        over = exchange(p, f"GET {target} HTTP/1.1\r\nHost: x\r\nX: {'a' * 66000}\r\n\r\n".encode())
        assert over.startswith(b"HTTP/1.1 431")
        assert b"65536" in over
    finally:
        origin.close()


def test_a_flood_of_bad_requests_is_summarised(proxy):
    p = proxy()
    for _ in range(40):
        exchange(p, b"GET /not-absolute HTTP/1.1\r\n\r\n")
    p.wait_stderr(r"proxy requests refused .*bad_request=")
    assert p.count_stderr(r"proxy request refused") <= 6


def test_forwarded_requests_are_logged(proxy):
    origin = KeepAliveOrigin()
    try:
        p = proxy()
        reply = exchange(p, f"GET http://127.0.0.1:{origin.port}/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert reply.endswith(b"hello")
        line = p.wait_stderr(r"http request forwarded")[0]
        assert "method=GET" in line and f"host=127.0.0.1:{origin.port}" in line
        assert "status=200" in line and "bytes=5" in line
    finally:
        origin.close()


def test_a_request_on_an_origin_connection_closed_meanwhile_is_sent_again(proxy):
    origin = KeepAliveOrigin()
    try:
        p = proxy("--log-level", "debug")
        target = f"http://127.0.0.1:{origin.port}/"
        with socket.create_connection(p.address, timeout=10) as s:
            for i in range(3):
                s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                head = b""
                while not head.endswith(b"hello"):
                    chunk = s.recv(4096)
                    assert chunk, f"request {i}: proxy closed"
                    head += chunk
                assert head.startswith(b"HTTP/1.1 200")
                # the origin closes its side right after each response
                time.sleep(0.4)
            # a POST is not repeated: the client learns the origin closed
            s.sendall(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi".encode())
            assert recv_all(s).startswith(b"HTTP/1.1 502")
        assert origin.connections == 3
        p.wait_stderr(r"request sent again", count=2)  # the log reader may trail the replies
        assert p.count_stderr(r"request sent again") == 2
    finally:
        origin.close()


def test_drain_closes_idle_kept_alive_clients_at_once(proxy):
    origin = KeepAliveOrigin()
    try:
        p = proxy("--drain-timeout", "30s")
        with socket.create_connection(p.address, timeout=10) as s:
            s.sendall(f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            reply = b""
            while not reply.endswith(b"hello"):
                reply += s.recv(4096)
            start = time.monotonic()
            p.send_signal(signal.SIGTERM)
            assert s.recv(100) == b""
            assert p.wait_exit(10) == 0
            assert time.monotonic() - start < 5
    finally:
        origin.close()
