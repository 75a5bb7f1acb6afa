"""Shared pieces of the `culvert proxy` tests: the running proxy (its fixture `proxy` is in
conftest), an HTTP origin to reach through it (`blob_origin` serves 16 MiB), `-D` through
a tunnel, raw SOCKS5 requests, and UDP ASSOCIATE: a UDP echo (`udp_echo`), PySocks as
the independent client, and the echo exchange (local and through the tunnel).  Its
fixtures reach every test through `pytest_plugins` in conftest.py."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import struct
import subprocess
import threading

import pytest

from conftest import Culvert, parse_addr, recv_exactly
from tunnel_support import UdpServer, settle_fd_count

READY_RE = re.compile(r"^listening proxy (\S+)$")
EXPOSED_PROXY_RE = re.compile(r"^exposed proxy (\S+)$")
BLOB = os.urandom(16 * 1024 * 1024)
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


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


class BlobHandler(QuietHandler):
    """The tunnel tests' origin answers: /blob (16 MiB) and anything else a short text."""

    def do_GET(self):
        body = BLOB if self.path == "/blob" else b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def blob_origin():
    """An Origin serving BlobHandler on 127.0.0.1."""
    o = Origin(BlobHandler)
    yield o
    o.close()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "30", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)


def fetch_sha(args: list[str], url: str) -> str:
    r = curl(*args, url)
    assert r.returncode == 0, r.stderr
    return hashlib.sha256(r.stdout).hexdigest()


def start_dynamic(kit, server_opts: list[str], client_opts: list[str] = ()):
    """A plain tunnel server with `server_opts` and a client of it with `-D 0`: the two
    processes and the client proxy's address."""
    server = kit.start_server("plain", opts=server_opts)
    client = kit.start_client(server.server_addr, [], mode="plain", opts=["-D", "0", *client_opts], ready=False)
    proxy = parse_addr(client.wait_stdout(READY_RE)[0].group(1))
    return server, client, proxy


def connect_code(address: tuple[str, int], port: int) -> int:
    """The reply code of a raw SOCKS5 CONNECT (no auth) to 127.0.0.1:`port`."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", port))
        return s.recv(10)[1]


def associate(proxy: tuple[str, int]) -> tuple[socket.socket, int, tuple[str, int] | None]:
    """A raw UDP ASSOCIATE: the TCP connection, the reply code and the relay address."""
    s = socket.create_connection(proxy, timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert recv_exactly(s, 2) == b"\x05\x00"
    s.sendall(b"\x05\x03\x00\x01" + socket.inet_aton("0.0.0.0") + struct.pack(">H", 0))
    reply = recv_exactly(s, 10)
    relay = (socket.inet_ntoa(reply[4:8]), struct.unpack(">H", reply[8:10])[0]) if reply[1] == 0 else None
    return s, reply[1], relay


def wrap(payload: bytes, port: int, host: str = "127.0.0.1") -> bytes:
    """A SOCKS5 UDP request header for host:port (IPv4) before `payload`."""
    return bytes([0, 0, 0, 1]) + socket.inet_aton(host) + struct.pack(">H", port) + payload


def check_association_ends_with_its_tcp(proxy: tuple[str, int], echo_port: int, server, client,
                                        server_closed: str) -> None:
    """An association through the tunnel echoes, then ends with its TCP connection on both
    ends: its relay socket is gone (the kernel answers port unreachable) and server and
    client are back to their descriptor counts. One association is made and closed first,
    so that what is built once (datagram batches) is in place before the count.
    `server_closed` is the server's log line for an ended association."""
    tcp, _, _ = associate(proxy)
    tcp.close()
    client.wait_stderr(r"udp association closed")
    server.wait_stderr(server_closed)
    base = {p: settle_fd_count(p.pid) for p in (server, client)}
    tcp, code, relay = associate(proxy)
    assert code == 0
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.connect(relay)
    u.send(wrap(b"ping", echo_port))
    assert u.recv(1000).endswith(b"ping")
    tcp.close()
    assert "reason=client closed" in client.wait_stderr(r"udp association closed", count=2)[-1].replace('"', "")
    server.wait_stderr(server_closed, count=2)
    u.send(wrap(b"late", echo_port))
    with pytest.raises(ConnectionRefusedError):
        u.recv(1000)
    u.close()
    for p, before in base.items():
        assert settle_fd_count(p.pid) <= before, p.describe()


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


@pytest.fixture
def udp_echo():
    """A UDP echo server on 127.0.0.1, closed at the end."""
    server = UdpServer(lambda data: data)
    yield server
    server.close()


def pysocks_udp(proxy: tuple[str, int]) -> socket.socket:
    """A UDP socket of PySocks through the SOCKS5 proxy at `proxy` (names go to the proxy
    to resolve); the test is skipped without PySocks."""
    socks = pytest.importorskip("socks", reason="PySocks is needed: pip install PySocks (make deps)")
    u = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    u.set_proxy(socks.SOCKS5, proxy[0], proxy[1], rdns=True)
    u.settimeout(5)
    return u


def check_pysocks_echo_through_tunnel(proxy: tuple[str, int], echo_port: int, server, client,
                                      server_closed: str) -> None:
    """PySocks through a proxy of the tunnel (`-D` or `-R proxy:`): 200 datagrams and one
    of 60000 bytes echoed whole, and when the association closes, client and server each
    count 201 datagrams each way. `server_closed` is the server's log line for an ended
    association."""
    u = pysocks_udp(proxy)
    udp_echo_exchange(u, ("127.0.0.1", echo_port), count=200, window=20, big=60000)
    u.close()
    line = client.wait_stderr(r"udp association closed")[0]
    assert "datagrams_up=201" in line and "datagrams_down=201" in line, line
    line = server.wait_stderr(server_closed)[0]
    assert "datagrams_up=201" in line and "datagrams_down=201" in line, line


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
