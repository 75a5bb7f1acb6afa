"""PROXY protocol (haproxy's proxy-protocol.txt) end to end: `forward tcp --send-proxy` /
`--accept-proxy`, `client --send-proxy`, `server --accept-proxy`, against haproxy, nginx
and a parser written here from the spec."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import Culvert, EchoServer, free_port, recv_all, recv_exactly
from tunnel_support import poll

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def read_proxy_header(conn: socket.socket) -> tuple[str, dict]:
    """Reads one PROXY header off `conn`, byte-exact; (version, fields)."""
    first = conn.recv(1, socket.MSG_PEEK)
    if first == b"P":
        line = b""
        while not line.endswith(b"\r\n"):
            b = conn.recv(1)
            assert b, f"closed inside the v1 line {line!r}"
            line += b
        parts = line[:-2].decode().split(" ")
        assert parts[0] == "PROXY", line
        if parts[1] == "UNKNOWN":
            return "v1", {"local": True}
        assert len(parts) == 6 and parts[1] in ("TCP4", "TCP6"), line
        return "v1", {"src": (parts[2], int(parts[4])), "dst": (parts[3], int(parts[5]))}
    fixed = recv_exactly(conn, 16)
    assert fixed[:12] == V2_SIGNATURE, fixed
    ver_cmd, fam, length = fixed[12], fixed[13], struct.unpack("!H", fixed[14:16])[0]
    assert ver_cmd >> 4 == 2, ver_cmd
    body = recv_exactly(conn, length)
    if ver_cmd & 0xF == 0:
        return "v2", {"local": True}
    if fam == 0x11:
        src, dst = socket.inet_ntop(socket.AF_INET, body[0:4]), socket.inet_ntop(socket.AF_INET, body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    else:
        assert fam == 0x21, fam
        src, dst = socket.inet_ntop(socket.AF_INET6, body[0:16]), socket.inet_ntop(socket.AF_INET6, body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
    return "v2", {"src": (src, sport), "dst": (dst, dport)}


class ProxyParsingServer(EchoServer):
    """Takes a PROXY header, records it, then echoes the connection's bytes."""

    def __init__(self):
        self.headers: list[tuple[str, dict]] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        header = read_proxy_header(conn)
        with self._lock:
            self.headers.append(header)
        super().handle(conn)


def connect_from(source_host: str, addr: tuple[str, int]) -> socket.socket:
    """A connection from a loopback address of our choice, so the address seen at
    the far end can only have come through a PROXY header."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source_host, 0))
    s.settimeout(10)
    s.connect(addr)
    return s


def echo_from(source_host: str, addr: tuple[str, int], payload: bytes = b"hello through the proxy") -> int:
    """Sends `payload` from `source_host`, checks the echo; the source port used."""
    s = connect_from(source_host, addr)
    port = s.getsockname()[1]
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    got = recv_all(s)
    s.close()
    assert got == payload
    return port


def get_from(source_host: str, addr: tuple[str, int]) -> tuple[int, bytes]:
    """Sends an HTTP/1.0 GET from `source_host`; (source port used, the whole answer)."""
    s = connect_from(source_host, addr)
    port = s.getsockname()[1]
    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    answer = recv_all(s)
    s.close()
    return port, answer


def wait_listening(addr: tuple[str, int], what: str) -> None:
    def up():
        try:
            socket.create_connection(addr, timeout=1).close()
            return True
        except OSError:
            return False
    poll(up, 15, f"{what} listening on {addr}")


class Daemon:
    """haproxy or nginx in the foreground with a generated config in a temp dir."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out.decode(errors="replace")


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(args: list[str]) -> Daemon:
        d = Daemon(args)
        started.append(d)
        return d

    yield start
    for d in started:
        print(d.stop())


@pytest.fixture
def processes(culvert_path):
    started: list[Culvert] = []

    def start(args: list[str]) -> Culvert:
        c = Culvert(culvert_path, args)
        started.append(c)
        return c

    yield start
    for c in started:
        c.kill()
        print(c.describe(tail=30))


def haproxy(daemons, tmp_path: Path, body: str, port: int) -> Daemon:
    if not shutil.which("haproxy"):
        pytest.skip("haproxy is not installed (make deps)")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("global\n    log stderr format raw local0 info\n"
                   "defaults\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n" + body)
    d = daemons(["haproxy", "-f", str(cfg), "-db"])
    wait_listening(("127.0.0.1", port), "haproxy")
    return d


def start_forward(processes, *args: str) -> tuple[Culvert, tuple[str, int]]:
    c = processes(["forward", "tcp", *args])
    c.wait_ready(1)
    return c, c.addr


def closed_line_for(proc: Culvert, peer: str) -> dict:
    def find():
        return next((r for r in proc.closed_records() if r.get("peer") == peer), None)
    return poll(find, 10, f"a 'connection closed' line for {peer}")


# --------------------------------------------------------------------------
# accepting: haproxy in front of `forward tcp --accept-proxy`


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_of_accept_proxy_logs_the_real_client(processes, daemons, tmp_path, send):
    echo = EchoServer()
    try:
        fwd, addr = start_forward(processes, "--accept-proxy", "127.0.0.1:0", echo.address)
        front = free_port()
        haproxy(daemons, tmp_path, f"""
frontend fe
    mode tcp
    bind 127.0.0.1:{front}
    default_backend be
backend be
    mode tcp
    server culvert 127.0.0.1:{addr[1]} {send}
""", front)
        port = echo_from("127.0.0.5", ("127.0.0.1", front))
        record = closed_line_for(fwd, f"127.0.0.5:{port}")
        assert record["reason"] == "eof"
        assert not fwd.stderr_matching("bad PROXY header")
    finally:
        echo.close()


def test_accept_proxy_refuses_a_bare_client_with_one_line_and_keeps_serving(processes):
    echo = EchoServer()
    try:
        fwd, addr = start_forward(processes, "--accept-proxy", "127.0.0.1:0", echo.address)
        s = connect_from("127.0.0.8", addr)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        s.close()
        line = fwd.wait_stderr("bad PROXY header")[0]
        assert "proxy_header_missing" in line and "127.0.0.8" in line
        # A v2 header that lies about its length is refused too, before any target is dialled.
        s = connect_from("127.0.0.8", addr)
        s.sendall(V2_SIGNATURE + b"\x21\x11\xff\xff")
        fwd.wait_stderr("proxy_header_oversized")
        s.close()
        assert echo.accepted == 0
        # Whoever sends a header is served, and logged under the header's source.
        s = socket.create_connection(addr, timeout=10)
        s.sendall(b"PROXY TCP4 198.51.100.20 10.0.0.1 4242 80\r\nping")
        assert recv_exactly(s, 4) == b"ping"
        s.close()
        closed_line_for(fwd, "198.51.100.20:4242")
        assert fwd.count_stderr("bad PROXY header") == 2
    finally:
        echo.close()


# --------------------------------------------------------------------------
# sending: `forward tcp --send-proxy` to haproxy, nginx and the parser here


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_names_the_client_to_haproxy(processes, daemons, tmp_path, version):
    front = free_port()
    haproxy(daemons, tmp_path, f"""
frontend fe
    mode http
    bind 127.0.0.1:{front} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src]:%[src_port]"
""", front)
    _, addr = start_forward(processes, "--send-proxy", version, "127.0.0.1:0", f"127.0.0.1:{front}")
    port, answer = get_from("127.0.0.6", addr)
    assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.split(b"\r\n\r\n", 1)[1] == f"127.0.0.6:{port}".encode()


@pytest.mark.parametrize("splice", [[], ["--no-splice"]], ids=["splice", "buffered"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_header_precedes_every_client_byte(processes, version, splice):
    target = ProxyParsingServer()
    try:
        _, addr = start_forward(processes, "--send-proxy", version, *splice, "127.0.0.1:0", target.address)
        payload = bytes(range(256)) * 1024
        port = echo_from("127.0.0.9", addr, payload)
        assert target.headers == [(version, {"src": ("127.0.0.9", port), "dst": ("127.0.0.1", addr[1])})]
    finally:
        target.close()


def test_accept_proxy_and_send_proxy_pass_the_original_client_on(processes):
    target = ProxyParsingServer()
    try:
        _, addr = start_forward(processes, "--accept-proxy", "--send-proxy", "v2", "127.0.0.1:0", target.address)
        s = socket.create_connection(addr, timeout=10)
        s.sendall(b"PROXY TCP6 2001:db8::5 2001:db8::1 5555 443\r\nabc")
        assert recv_exactly(s, 3) == b"abc"
        s.close()
        assert target.headers == [("v2", {"src": ("2001:db8::5", 5555), "dst": ("2001:db8::1", 443)})]
    finally:
        target.close()


def test_send_proxy_names_the_client_to_nginx(processes, daemons, tmp_path):
    if not shutil.which("nginx"):
        pytest.skip("nginx is not installed")
    port = free_port()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    temps = "\n".join(f"    {k}_temp_path {prefix}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    cfg = prefix / "nginx.conf"
    cfg.write_text(f"""
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temps}
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{ return 200 "$proxy_protocol_addr:$proxy_protocol_port"; }}
    }}
}}
""")
    daemons(["nginx", "-p", str(prefix), "-c", str(cfg), "-g", "daemon off; master_process off;"])
    wait_listening(("127.0.0.1", port), "nginx")
    _, addr = start_forward(processes, "--send-proxy", "v1", "127.0.0.1:0", f"127.0.0.1:{port}")
    source_port, answer = get_from("127.0.0.10", addr)
    assert answer.split(b"\r\n\r\n", 1)[1] == f"127.0.0.10:{source_port}".encode(), answer


# --------------------------------------------------------------------------
# through the tunnel


@pytest.mark.parametrize("mux", ["0", "1"], ids=["dedicated", "mux"])
def test_local_service_behind_the_tunnel_learns_the_visitor(kit, mux):
    local = kit.local(ProxyParsingServer())
    server = kit.start_server()
    client = kit.start_client(server.server_addr, [f"0:127.0.0.1:{local.port}"], opts=["--send-proxy", "v2", "--mux", mux])
    public = next(iter(client.exposed_map.values()))
    port = echo_from("127.0.0.11", ("127.0.0.1", public[1]))
    version, fields = local.headers[0]
    assert version == "v2"
    assert fields == {"src": ("127.0.0.11", port), "dst": ("127.0.0.1", local.port)}


def test_server_behind_haproxy_passes_the_visitor_on_to_the_local_service(kit, daemons, tmp_path):
    local = kit.local(ProxyParsingServer())
    server = kit.start_server(opts=["--accept-proxy"])
    client = kit.start_client(server.server_addr, [f"0:127.0.0.1:{local.port}"], opts=["--send-proxy", "v1"])
    public = next(iter(client.exposed_map.values()))
    front = free_port()
    haproxy(daemons, tmp_path, f"""
frontend fe
    mode tcp
    bind 127.0.0.1:{front}
    default_backend be
backend be
    mode tcp
    server tunnel 127.0.0.1:{public[1]} send-proxy-v2
""", front)
    port = echo_from("127.0.0.12", ("127.0.0.1", front))
    # (wait_listening's probe went through haproxy too, as 127.0.0.1)
    assert ("v1", {"src": ("127.0.0.12", port), "dst": ("127.0.0.1", local.port)}) in local.headers
    closed_line_for(server, f"127.0.0.12:{port}")


def test_server_refuses_visitors_without_a_header_and_cuts_slow_ones(kit):
    echo = kit.echo()
    server = kit.start_server(opts=["--accept-proxy", "--handshake-timeout", "1s"])
    client = kit.start_client(server.server_addr, [f"0:127.0.0.1:{echo.port}"])
    public = ("127.0.0.1", next(iter(client.exposed_map.values()))[1])
    s = connect_from("127.0.0.13", public)
    s.sendall(b"hello without a header")
    server.wait_stderr("visitor refused: bad PROXY header.*proxy_header_missing")
    s.close()
    slow = connect_from("127.0.0.14", public)
    slow.sendall(b"PROXY TCP4 ")
    server.wait_stderr("visitor refused: bad PROXY header.*proxy_header_timeout", timeout=10)
    slow.close()
    assert echo.accepted == 0
    s = socket.create_connection(public, timeout=10)
    s.sendall(b"PROXY TCP4 203.0.113.30 10.0.0.1 3030 80\r\nstill serving")
    assert recv_exactly(s, 13) == b"still serving"
    s.close()
    closed_line_for(server, "203.0.113.30:3030")
    assert server.count_stderr("bad PROXY header") == 2
