"""Shared helpers and fixtures of the WebSocket end-to-end tests (issue 15).

The tunnel over ws/wss: `ws_server`/`ws_client` on conftest's `kit`, an nginx
terminating TLS in front of it (`nginx`) and an authenticating `culvert proxy`
(`http_proxy`).  The bridges (`culvert forward ws|tcp`): the `bridge` factory and a raw
WebSocket client for what a well-behaved library will not send.  The fixtures reach
every test through `pytest_plugins` in conftest.py.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import Culvert
from tunnel_support import TunnelKit, free_port, poll, wait_for_binary

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


# --------------------------------------------------------------------------
# the tunnel over WebSocket


def ws_server(kit: TunnelKit, transport: str, opts=()) -> tuple[str, int]:
    args = ["--transport", transport, "--ws-path", "/tunnel", "--threads", "2", *opts]
    if transport == "wss":
        args += ["--cert", kit.certs.cert, "--key", kit.certs.key]
    return kit.start_server("tls-psk", args).server_addr


def ws_client(kit: TunnelKit, url: str, services: list[str], opts=(), ready: bool = True):
    client = kit.start_client(url, services, mode_args=[], opts=["--threads", "2", *opts], ready=False)
    if ready:
        client.exposed_map = client.exposed(sum(not s.startswith("udp:") for s in services))
    return client


class Nginx:
    """nginx in the foreground with a generated config on 127.0.0.1:`port` in front of the
    ws tunnel server on `upstream`: TLS with `certs`, or plain HTTP with `tls=False`;
    `upstream_tls=True` dials the upstream with TLS of its own (a wss server), as a CDN
    that re-encrypts to the origin does."""

    def __init__(self, tmp: Path, certs, upstream: int, upgrade: bool = True, read_timeout: str = "60s",
                 tls: bool = True, upstream_tls: bool = False):
        self.prefix = tmp / f"nginx-{upstream}-{int(upgrade)}-{read_timeout}-{int(tls)}-{int(upstream_tls)}"
        (self.prefix / "logs").mkdir(parents=True)
        self.port = free_port()
        headers = ("proxy_set_header Upgrade $http_upgrade;\n            proxy_set_header Connection \"upgrade\";"
                   if upgrade else "")
        listen = (f"listen 127.0.0.1:{self.port} ssl;\n        server_name localhost;\n"
                  f"        ssl_certificate {certs.cert};\n        ssl_certificate_key {certs.key};\n"
                  f"        ssl_protocols TLSv1.2 TLSv1.3;" if tls else f"listen 127.0.0.1:{self.port};")
        conf = self.prefix / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
error_log {self.prefix}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {self.prefix}/body;
    proxy_temp_path {self.prefix}/proxy;
    server {{
        {listen}
        location /tunnel {{
            proxy_pass {"https" if upstream_tls else "http"}://127.0.0.1:{upstream};
            {"proxy_ssl_protocols TLSv1.3;" if upstream_tls else ""}
            proxy_http_version 1.1;
            {headers}
            proxy_read_timeout {read_timeout};
            proxy_send_timeout {read_timeout};
        }}
    }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-c", str(conf),
                                      "-g", f"daemon off; pid {self.prefix}/nginx.pid;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def listening():
            assert self.proc.poll() is None, f"nginx exited: {self.proc.stderr.read().decode(errors='replace')}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        poll(listening, 10, "nginx listening")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def nginx(tmp_path, kit):
    """Factory: nginx(upstream, upgrade=..., read_timeout=..., tls=...) -> Nginx, TLS with kit's
    certificates unless tls=False."""
    if NGINX is None:
        pytest.skip("nginx not installed")
    started: list[Nginx] = []

    def start(upstream: int, **kw) -> Nginx:
        n = Nginx(tmp_path, kit.certs, upstream, **kw)
        started.append(n)
        return n

    yield start
    for n in started:
        n.close()


@pytest.fixture
def http_proxy(tmp_path):
    """The port of a `culvert proxy` that takes alice:s3cret (HTTP CONNECT and SOCKS5)."""
    auth = tmp_path / "proxy-users"
    auth.write_text("alice:s3cret\n")
    os.chmod(auth, 0o600)
    p = Culvert(wait_for_binary(), ["proxy", "--auth-file", str(auth), "127.0.0.1:0"])
    m = p.wait_stdout(re.compile(r"^listening proxy (\S+):(\d+)$"), 1, 15.0)[0]
    yield int(m.group(2))
    p.kill()


# --------------------------------------------------------------------------
# the bridges

BRIDGE_READY_RE = re.compile(r"^listening (?:ws|wss|tcp) (\S+) -> (\S+)$")


class Bridge(Culvert):
    """A running `culvert forward ws|tcp`, past its ready line."""

    ready_re = BRIDGE_READY_RE

    def stderr_text(self) -> str:
        with self._cond:
            return "\n".join(self.stderr_lines)


@pytest.fixture
def bridge():
    """Factory: bridge(kind, listen, *targets, opts=...) -> Bridge; killed at teardown."""
    procs: list[Bridge] = []
    path = wait_for_binary()

    def start(kind: str, listen: str, *targets: str, opts=()) -> Bridge:
        b = Bridge(path, ["forward", kind, "--threads", "2", *opts, listen, *targets])
        procs.append(b)
        b.wait_ready(1)
        return b

    yield start
    for b in procs:
        b.kill()
        print(b.describe(tail=40))


def addr_of(b: Bridge) -> str:
    host, port = b.addr
    return f"{host}:{port}"


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- raw WebSocket client (for what libraries will not send) ----------------


def raw_upgrade(addr: tuple[str, int], path: str = "/", extra: str = "") -> tuple[socket.socket, bytes]:
    """Opens a socket, sends an upgrade request; returns it and the answer's head (and
    whatever followed it)."""
    s = socket.create_connection(addr, timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
    return s, read_head(s)


def read_head(s: socket.socket) -> bytes:
    """Reads until the blank line that ends an HTTP head (or EOF); returns all it read."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def frame(opcode: int, payload: bytes, mask: bytes | None = None, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + struct.pack("!H", n)
    else:
        head += bytes([m | 127]) + struct.pack("!Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


def read_frames(s: socket.socket, buffered: bytes, timeout: float) -> tuple[list[tuple[int, bytes]], bool]:
    """Server frames until the connection ends (or `timeout`); True when it ended."""
    data = bytearray(buffered)
    s.settimeout(timeout)
    ended = False
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                ended = True
                break
            data += chunk
    except socket.timeout:
        pass
    except ConnectionResetError:
        ended = True
    frames = []
    i = 0
    while i + 2 <= len(data):
        op, n = data[i] & 0x0F, data[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            n, j = struct.unpack("!H", data[j:j + 2])[0], j + 2
        elif n == 127:
            n, j = struct.unpack("!Q", data[j:j + 8])[0], j + 8
        frames.append((op, bytes(data[j:j + n])))
        i = j + n
    return frames, ended


def close_code(frames: list[tuple[int, bytes]]) -> int | None:
    closes = [p for op, p in frames if op == 8]
    return struct.unpack("!H", closes[0][:2])[0] if closes and len(closes[0]) >= 2 else None
