"""End-to-end tests of `culvert proxy`: SOCKS5 and HTTP on one port, driven by clients
culvert did not write (curl, PySocks) and by raw sockets for the reply codes.

Loopback only; every wait is bounded (ready lines, socket timeouts, polls)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import EchoServer, MiB, expect_closed, ipv6_loopback_available, recv_all, run_culvert
from proxy_support import Origin, ProxyProc, QuietHandler, recv_up_to
from tunnel_support import fd_count, free_port, poll, settle_fd_count

socks = pytest.importorskip("socks", reason="PySocks is needed: pip install PySocks (make deps)")

BLOB = bytes(range(256)) * (16 * MiB // 256)
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


# --------------------------------------------------------------------------
# helpers


class OriginHandler(QuietHandler):
    """The origin's answers: /blob (16 MiB, Content-Length), /chunked (chunked body),
    /peer (the port the request came from), POST /sha (sha256 of the body, either
    framing)."""

    def send_body(self, body: bytes, chunked: bool = False):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 7000):
                piece = body[i:i + 7000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def do_GET(self):
        if self.path == "/blob":
            self.send_body(BLOB)
        elif self.path == "/chunked":
            self.send_body(BLOB[:100_000], chunked=True)
        elif self.path == "/peer":
            self.send_body(str(self.client_address[1]).encode())
        else:
            self.send_body(b"hello\n")

    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_body(hashlib.sha256(body).hexdigest().encode())


@pytest.fixture
def origin():
    o = Origin(OriginHandler)
    yield o
    o.close()


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "30", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)


def proxy_url(p: ProxyProc, scheme: str) -> str:
    host, port = p.address
    return f"{scheme}://{host}:{port}"


def socks_exchange(p: ProxyProc, request: bytes, auth: tuple[bytes, bytes] | None = None,
                   methods: bytes | None = None) -> bytes:
    """One raw SOCKS5 handshake; returns what the proxy sent after the method choice
    (and the auth status), up to its close or 10 bytes past the reply head."""
    s = socket.create_connection(p.address, timeout=10)
    try:
        offered = methods if methods is not None else (b"\x02" if auth else b"\x00")
        s.sendall(b"\x05" + bytes([len(offered)]) + offered)
        choice = recv_up_to(s, 2)
        if choice[1] == 0xFF:
            return choice
        if auth:
            user, password = auth
            s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            status = recv_up_to(s, 2)
            if status[1] != 0:
                return status
        s.sendall(request)
        return recv_up_to(s, 10)
    finally:
        s.close()


def connect_v4(host: str, port: int, cmd: int = 1) -> bytes:
    return bytes([5, cmd, 0, 1]) + socket.inet_aton(host) + struct.pack(">H", port)


def connect_name(name: str, port: int) -> bytes:
    return bytes([5, 1, 0, 3, len(name)]) + name.encode() + struct.pack(">H", port)


def http_exchange(p: ProxyProc, request: bytes) -> bytes:
    """Sends raw bytes to the proxy and returns everything up to its close."""
    with socket.create_connection(p.address, timeout=10) as s:
        s.sendall(request)
        return recv_all(s)


def echo_bulk(sock: socket.socket, payload: bytes) -> str:
    """Sends `payload` through an echo while reading it back; the sha256 of what came back."""
    def send():
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    got = recv_all(sock)
    t.join(timeout=30)
    return hashlib.sha256(got).hexdigest()


# --------------------------------------------------------------------------
# SOCKS5


def test_socks5_curl_fetches_bulk_by_address_and_by_name(proxy, origin):
    p = proxy()
    for flag, host in (("--socks5", "127.0.0.1"), ("--socks5-hostname", "localhost")):
        r = curl(flag, f"{p.address[0]}:{p.address[1]}", f"http://{host}:{origin.port}/blob")
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == BLOB_SHA
    assert len(p.closed_records()) == 2


def test_socks5_pysocks_echoes_16_mib(proxy):
    echo = EchoServer()
    try:
        p = proxy()
        s = socks.socksocket()
        s.set_proxy(socks.SOCKS5, p.address[0], p.address[1])
        s.settimeout(30)
        s.connect(("127.0.0.1", echo.port))
        assert echo_bulk(s, BLOB) == BLOB_SHA
        s.close()
    finally:
        echo.close()


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_socks5_reaches_an_ipv6_destination(proxy):
    echo = EchoServer("::1")
    try:
        p = proxy()
        # PySocks reaches the proxy over IPv4 and sends the IPv6 destination (ATYP 4).
        s = socks.socksocket()
        s.set_proxy(socks.SOCKS5, p.address[0], p.address[1])
        s.settimeout(30)
        s.connect(("::1", echo.port))
        assert echo_bulk(s, BLOB[:MiB]) == hashlib.sha256(BLOB[:MiB]).hexdigest()
        s.close()
    finally:
        echo.close()


def test_socks5_reply_codes(proxy, origin):
    p = proxy("--deny", "127.0.0.2", "--connect-timeout", "2s")
    closed = free_port()
    assert socks_exchange(p, connect_v4("127.0.0.1", closed))[1] == 0x05  # connection refused
    assert socks_exchange(p, connect_v4("127.0.0.2", origin.port))[1] == 0x02  # not allowed
    assert socks_exchange(p, connect_v4("127.0.0.1", origin.port, cmd=2))[1] == 0x07  # BIND
    assert socks_exchange(p, connect_v4("127.0.0.1", origin.port, cmd=3))[1] == 0x00  # UDP ASSOCIATE (test_proxy_udp.py)
    assert socks_exchange(p, connect_v4("127.0.0.1", origin.port, cmd=9))[1] == 0x07  # unknown command
    assert socks_exchange(p, bytes([5, 1, 0, 9, 1, 2, 3, 4, 0, 80]))[1] == 0x08  # address type
    assert socks_exchange(p, connect_name("no-such-host.invalid", 80))[1] == 0x04  # host unreachable
    assert socks_exchange(p, connect_name("bad name!", 80))[1] == 0x04
    ok = socks_exchange(p, connect_v4("127.0.0.1", origin.port))
    assert ok[:4] == b"\x05\x00\x00\x01"
    p.wait_stderr(r"proxy request refused .*reason=refused")


def test_socks5_policy_applies_after_resolution(proxy, origin):
    p = proxy("--deny", "127.0.0.0/8")
    assert socks_exchange(p, connect_name("localhost", origin.port))[1] == 0x02
    r = curl("--socks5-hostname", f"{p.address[0]}:{p.address[1]}", f"http://localhost:{origin.port}/")
    assert r.returncode != 0


def test_allow_limits_destinations_to_what_it_names(proxy, origin):
    other = Origin(OriginHandler)
    try:
        p = proxy("--allow", f"127.0.0.1:{origin.port}", "--allow", "*.example.invalid")
        assert socks_exchange(p, connect_v4("127.0.0.1", origin.port))[1] == 0x00
        assert socks_exchange(p, connect_v4("127.0.0.1", other.port))[1] == 0x02
    finally:
        other.close()


def test_socks5_username_password(proxy, origin, tmp_path):
    auth = tmp_path / "users"
    auth.write_text("# users\nalice:s3cret\nbob:hunter2:with:colons\n")
    p = proxy("--auth-file", str(auth))
    ok = socks_exchange(p, connect_v4("127.0.0.1", origin.port), auth=(b"alice", b"s3cret"))
    assert ok[:2] == b"\x05\x00"
    assert socks_exchange(p, connect_v4("127.0.0.1", origin.port), auth=(b"bob", b"hunter2:with:colons"))[1] == 0
    assert socks_exchange(p, connect_v4("127.0.0.1", origin.port), auth=(b"alice", b"wrong")) == b"\x01\x01"
    assert socks_exchange(p, connect_v4("127.0.0.1", origin.port), methods=b"\x00") == b"\x05\xff"
    good = curl("--socks5", f"{p.address[0]}:{p.address[1]}", "--proxy-user", "alice:s3cret", f"http://127.0.0.1:{origin.port}/")
    assert good.returncode == 0 and good.stdout == b"hello\n", good.stderr
    bad = curl("--socks5", f"{p.address[0]}:{p.address[1]}", "--proxy-user", "alice:nope", f"http://127.0.0.1:{origin.port}/")
    assert bad.returncode != 0
    p.wait_stderr(r"wrong user or password")


# --------------------------------------------------------------------------
# HTTP


def test_http_connect_relays_16_mib(proxy):
    echo = EchoServer()
    try:
        p = proxy()
        s = socket.create_connection(p.address, timeout=30)
        s.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 200")
        assert echo_bulk(s, BLOB) == BLOB_SHA
        s.close()
    finally:
        echo.close()


def test_http_curl_plain_and_tunnelled(proxy, origin):
    p = proxy()
    for extra in ([], ["-p"]):
        r = curl(*extra, "-x", proxy_url(p, "http"), f"http://localhost:{origin.port}/blob")
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == BLOB_SHA


def test_http_keeps_the_client_connection_alive(proxy, origin, tmp_path):
    p = proxy()
    url = f"http://127.0.0.1:{origin.port}"
    body = tmp_path / "body"
    body.write_bytes(BLOB[:300_000])
    r = curl("-x", proxy_url(p, "http"),
             f"{url}/peer", "-o", str(tmp_path / "a"), f"{url}/chunked", "-o", str(tmp_path / "b"),
             f"{url}/peer", "-o", str(tmp_path / "c"),
             "-w", "%{num_connects}\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"1", b"0", b"0"]
    assert (tmp_path / "b").read_bytes() == BLOB[:100_000]
    # the origin connection is kept too: the same source port answers both times
    assert (tmp_path / "a").read_bytes() == (tmp_path / "c").read_bytes()
    post = curl("-x", proxy_url(p, "http"), "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{body}", f"{url}/sha")
    assert post.stdout.decode() == hashlib.sha256(BLOB[:300_000]).hexdigest(), post.stderr


def test_http_pipelined_requests_and_connection_close(proxy, origin):
    p = proxy()
    host = f"127.0.0.1:{origin.port}"
    reply = http_exchange(p, (
        f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\nProxy-Connection: keep-alive\r\n\r\n"
        f"POST http://{host}/sha HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nabcde"
    ).encode())
    assert reply.count(b"HTTP/1.1 200") == 2
    assert reply.endswith(hashlib.sha256(b"abcde").hexdigest().encode())
    assert b"Connection: close" in reply.split(b"\r\n\r\n")[-2]


def test_http_auth_answers_407(proxy, origin, tmp_path):
    auth = tmp_path / "users"
    auth.write_text("alice:s3cret\n")
    p = proxy("--auth-file", str(auth))
    url = f"http://127.0.0.1:{origin.port}/"
    missing = http_exchange(p, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert missing.startswith(b"HTTP/1.1 407")
    assert b'Proxy-Authenticate: Basic realm="culvert"' in missing
    for user, code in (("alice:s3cret", b"200"), ("alice:wrong", b"407")):
        r = curl("-x", proxy_url(p, "http"), "--proxy-user", user, url, "-o", "/dev/null", "-w", "%{http_code}")
        assert r.stdout == code
        r = curl("-p", "-x", proxy_url(p, "http"), "--proxy-user", user, url, "-o", "/dev/null", "-w", "%{http_connect}")
        assert r.stdout == code


def test_http_error_statuses(proxy, origin):
    p = proxy("--deny", "127.0.0.0/8:1-1000", "--handshake-timeout", "500ms")
    closed = free_port()
    cases = [
        (f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n\r\n", b"502"),
        (f"GET http://127.0.0.1:{closed}/ HTTP/1.1\r\n\r\n", b"502"),
        ("CONNECT localhost:80 HTTP/1.1\r\n\r\n", b"403"),
        ("GET /local HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        ("CONNECT nowhere HTTP/1.1\r\n\r\n", b"400"),
        ("GET http://x/ HTTP/1.1\r\nX: " + "a" * 70000 + "\r\n\r\n", b"431"),
    ]
    for request, status in cases:
        reply = http_exchange(p, request.encode())
        assert reply.startswith(b"HTTP/1.1 " + status), (request[:60], reply[:200])
        assert reply.split(b"\r\n\r\n", 1)[1].strip(), "error statuses carry a text body"
    # a client that never finishes its head is cut at the handshake deadline
    with socket.create_connection(p.address, timeout=10) as s:
        s.sendall(b"GET http://x/ HTTP/1.1\r\n")
        start = time.monotonic()
        assert expect_closed(s, 10) in ("eof", "reset")
        assert time.monotonic() - start < 5
    p.wait_stderr(r"reason=timed_out|timed_out=1")  # in full, or counted in the summary line


# --------------------------------------------------------------------------
# start-up rules and resources


def test_unauthenticated_proxy_on_a_public_address_is_refused(culvert_path, tmp_path):
    for listen in ("0.0.0.0:0", ":0"):
        r = run_culvert(culvert_path, ["proxy", listen])
        assert r.returncode == 2
        assert "--no-auth" in r.stderr and "--auth-file" in r.stderr
    auth = tmp_path / "users"
    auth.write_text("alice:s3cret\n")
    r = run_culvert(culvert_path, ["proxy", "--no-auth", "--auth-file", str(auth), "0"])
    assert r.returncode == 2
    r = run_culvert(culvert_path, ["proxy", "--deny", "10.0.0.0/33", "0"])
    assert r.returncode == 2 and "--deny" in r.stderr


def test_descriptors_return_to_baseline(proxy, origin):
    p = proxy()
    baseline = settle_fd_count(p.pid)
    for _ in range(20):
        assert curl("--socks5", f"{p.address[0]}:{p.address[1]}", f"http://127.0.0.1:{origin.port}/").returncode == 0
        assert curl("-x", proxy_url(p, "http"), f"http://127.0.0.1:{origin.port}/").returncode == 0
        socks_exchange(p, connect_v4("127.0.0.1", free_port()))
    # the resolver pool's threads and the relays' pooled pipes are allowed to stay
    poll(lambda: fd_count(p.pid) <= baseline + 4, 10, "descriptors back to baseline")
    assert p.terminate() == 0


@pytest.mark.skipif(shutil.which("proxychains4") is None, reason="proxychains4 not installed")
def test_proxychains_runs_an_unmodified_program(proxy, origin, tmp_path):
    p = proxy()
    conf = tmp_path / "proxychains.conf"
    conf.write_text(f"strict_chain\nquiet_mode\n[ProxyList]\nsocks5 {p.address[0]} {p.address[1]}\n")
    r = subprocess.run(["proxychains4", "-f", str(conf), "curl", "-sS", f"http://127.0.0.1:{origin.port}/blob"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert hashlib.sha256(r.stdout).hexdigest() == BLOB_SHA, r.stderr
