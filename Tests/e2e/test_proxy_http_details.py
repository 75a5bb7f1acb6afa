"""HTTP proxy details that curl and browsers rely on (RFC 9110/9112), through
`culvert proxy` to a python origin: `Expect: 100-continue` answered without the client's
wait, HEAD and 204/304 responses without a body (whatever Content-Length says), a body
delimited by the origin's close (passed whole, then the client's connection closes), and
requests pipelined on one connection answered in order.

Loopback only; every wait is bounded (socket timeouts, curl --max-time)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time

import pytest

from proxy_support import Origin, QuietHandler

BLOCK = os.urandom(300 * 1024)


class Handler(QuietHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        digest = hashlib.sha256(body).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(digest)))
        self.end_headers()
        self.wfile.write(digest)

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()

    def do_GET(self):
        if self.path == "/no-content":
            self.send_response(204)
            self.send_header("Content-Length", "5")
            self.end_headers()
        elif self.path == "/not-modified":
            self.send_response(304)
            self.send_header("Content-Length", "5")
            self.end_headers()
        elif self.path == "/until-close":
            # Neither Content-Length nor chunked: the body ends where the origin closes.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(BLOCK)
            self.close_connection = True
        else:
            body = f"path={self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@pytest.fixture
def origin():
    o = Origin(Handler)
    yield o
    o.close()


class Reader:
    """Responses read one after another from one connection (a shared buffer, so a
    response pipelined behind another is not lost)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            assert self._more(), f"connection closed inside a head: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), fields

    def body(self, n: int) -> bytes:
        while len(self.buf) < n:
            assert self._more(), "connection closed inside a body"
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest_until_close(self) -> bytes:
        while self._more():
            pass
        out, self.buf = self.buf, b""
        return out

    def closed(self) -> bool:
        """True when the peer closed with nothing more sent."""
        return not self.buf and not self._more()


def request(path: str, port: int, method: str = "GET") -> bytes:
    return f"{method} http://127.0.0.1:{port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


def connect(p) -> tuple[socket.socket, Reader]:
    s = socket.create_connection(p.address, timeout=10)
    return s, Reader(s)


def test_expect_100_continue_is_answered_without_the_clients_wait(proxy, origin, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is needed")
    p = proxy()
    upload = tmp_path / "upload"
    upload.write_bytes(BLOCK)
    started = time.monotonic()
    r = subprocess.run(["curl", "-sS", "--max-time", "20", "--expect100-timeout", "5", "-H", "Expect: 100-continue",
                        "-x", f"http://{p.address[0]}:{p.address[1]}", "--data-binary", f"@{upload}",
                        f"http://127.0.0.1:{origin.port}/upload"], capture_output=True)
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == hashlib.sha256(BLOCK).hexdigest()
    # curl sends the body on a 100 Continue, or after the 5 s it was told to wait.
    assert elapsed < 3, f"curl waited {elapsed:.1f} s for 100 Continue"


def test_expect_100_continue_from_a_raw_client_gets_one_interim_response(proxy, origin):
    p = proxy()
    s, r = connect(p)
    with s:
        body = b"x" * 1000
        s.sendall(f"POST http://127.0.0.1:{origin.port}/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        assert r.head()[0] == 100
        s.sendall(body)
        status, fields = r.head()
        assert status == 200
        assert r.body(int(fields["content-length"])).decode() == hashlib.sha256(body).hexdigest()
        # The connection is kept: the next request is served on it.
        s.sendall(request("/after", origin.port))
        status, fields = r.head()
        assert status == 200 and r.body(int(fields["content-length"])) == b"path=/after"


def test_head_response_has_no_body_and_the_connection_goes_on(proxy, origin):
    p = proxy()
    s, r = connect(p)
    with s:
        s.sendall(request("/thing", origin.port, method="HEAD"))
        status, fields = r.head()
        assert status == 200 and fields["content-length"] == "1000"
        s.sendall(request("/next", origin.port))
        status, fields = r.head()
        assert status == 200 and r.body(int(fields["content-length"])) == b"path=/next"


def test_curl_head_through_the_proxy(proxy, origin):
    if shutil.which("curl") is None:
        pytest.skip("curl is needed")
    p = proxy()
    r = subprocess.run(["curl", "-sS", "-I", "--max-time", "5", "-x", f"http://{p.address[0]}:{p.address[1]}",
                        f"http://127.0.0.1:{origin.port}/thing"], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert b"200" in r.stdout.split(b"\r\n")[0] and b"Content-Length: 1000" in r.stdout


@pytest.mark.parametrize("path,status", [("/no-content", 204), ("/not-modified", 304)])
def test_bodyless_statuses_pass_without_a_body_and_the_connection_goes_on(proxy, origin, path, status):
    p = proxy()
    s, r = connect(p)
    with s:
        s.sendall(request(path, origin.port))
        assert r.head()[0] == status
        s.sendall(request("/next", origin.port))
        got, fields = r.head()
        assert got == 200 and r.body(int(fields["content-length"])) == b"path=/next"


def test_body_until_the_origin_closes_is_passed_whole_then_the_client_is_closed(proxy, origin):
    p = proxy()
    s, r = connect(p)
    with s:
        s.sendall(request("/until-close", origin.port))
        status, fields = r.head()
        assert status == 200
        assert "content-length" not in fields and "transfer-encoding" not in fields
        assert fields.get("connection", "").lower() == "close"
        assert hashlib.sha256(r.rest_until_close()).digest() == hashlib.sha256(BLOCK).digest()


def test_curl_reads_a_body_delimited_by_close(proxy, origin):
    if shutil.which("curl") is None:
        pytest.skip("curl is needed")
    p = proxy()
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "-x", f"http://{p.address[0]}:{p.address[1]}",
                        f"http://127.0.0.1:{origin.port}/until-close"], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(BLOCK).digest()


def test_pipelined_requests_are_answered_in_order(proxy, origin):
    p = proxy()
    s, r = connect(p)
    with s:
        # Three requests in one send, the middle one HEAD, before any answer.
        s.sendall(request("/one", origin.port) + request("/two", origin.port, method="HEAD") + request("/three", origin.port))
        status, fields = r.head()
        assert status == 200 and r.body(int(fields["content-length"])) == b"path=/one"
        status, fields = r.head()
        assert status == 200 and fields["content-length"] == "1000"
        status, fields = r.head()
        assert status == 200 and r.body(int(fields["content-length"])) == b"path=/three"
        s.sendall(f"GET http://127.0.0.1:{origin.port}/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, fields = r.head()
        assert status == 200 and r.body(int(fields["content-length"])) == b"path=/last"
        assert r.closed()
