"""The tunnel over WebSocket (issue 15): `culvert server --transport ws|wss` and clients
given a ws:// or wss:// URL, straight and behind a real nginx (TLS terminated by nginx,
with and without the Upgrade headers, with a short proxy_read_timeout), and through
`culvert proxy` with Basic auth (--proxy http://USER:PASS@…)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time

import pytest

from conftest import MiB
from tunnel_support import TunnelKit, UdpServer, assert_echoed, poll
from ws_support import ws_client, ws_server

UDP_RE = re.compile(r"^exposed udp 127\.0\.0\.1:(\d+) -> ")


def udp_port(client) -> int:
    return int(client.wait_stdout(UDP_RE, 1, 15.0)[0].group(1))


def check_tcp_and_udp(tcp_addr: tuple[str, int], udp_addr: tuple[str, int]) -> None:
    """A SHA-256-checked 4 MiB echo and a few hundred checked datagrams."""
    assert_echoed(tcp_addr, [os.urandom(4 * MiB), os.urandom(64 * 1024)], timeout=30)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        answered = 0
        for _ in range(200):
            data = os.urandom(1200)
            s.sendto(data, udp_addr)
            try:
                reply, _ = s.recvfrom(2048)
            except socket.timeout:
                continue
            assert reply == hashlib.sha256(data).digest()
            answered += 1
        assert answered >= 190, f"only {answered}/200 datagrams answered"
    finally:
        s.close()


def services(kit: TunnelKit, udp: UdpServer) -> list[str]:
    echo = kit.echo()
    return [f"127.0.0.1:0:127.0.0.1:{echo.port}", f"udp:127.0.0.1:0:127.0.0.1:{udp.port}"]


def exposed_pair(client) -> tuple[tuple[str, int], tuple[str, int]]:
    (tcp,) = client.exposed_map.values()
    return tcp, ("127.0.0.1", udp_port(client))


@pytest.fixture
def udp_targets():
    started: list[UdpServer] = []

    def start() -> UdpServer:
        s = UdpServer(lambda d: hashlib.sha256(d).digest())
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_tunnel_over_websocket_carries_tcp_and_udp_with_and_without_mux(kit, udp_targets, transport):
    host, port = ws_server(kit, transport)
    scheme_opts = ["--ca", kit.certs.ca] if transport == "wss" else []
    name = "localhost" if transport == "wss" else "127.0.0.1"
    for mux in ([], ["--mux", "0"]):
        client = ws_client(kit, f"{transport}://{name}:{port}/tunnel", services(kit, udp_targets()), opts=[*scheme_opts, *mux])
        check_tcp_and_udp(*exposed_pair(client))


def test_wrong_path_gets_404_and_one_log_line(kit):
    host, port = ws_server(kit, "ws")
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 404 ")
    server = kit.procs[0]
    poll(lambda: "no WebSocket endpoint at this path" in server.stderr_text(), 5, "the refusal's log line")
    client = ws_client(kit, f"ws://127.0.0.1:{port}/wrong", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"], ready=False)
    poll(lambda: client.stderr_text().count("check the URL's path against the server's --ws-path") >= 2, 10,
         "the client's explained 404, retried")


# --------------------------------------------------------------------------
# behind nginx


def test_behind_nginx_terminating_tls(kit, nginx, udp_targets):
    _, port = ws_server(kit, "ws")
    front = nginx(port)
    client = ws_client(kit, f"wss://localhost:{front.port}/tunnel", services(kit, udp_targets()), opts=["--ca", kit.certs.ca])
    check_tcp_and_udp(*exposed_pair(client))


def test_nginx_without_upgrade_headers_is_explained_and_retried(kit, nginx):
    _, port = ws_server(kit, "ws")
    front = nginx(port, upgrade=False)
    client = ws_client(kit, f"wss://localhost:{front.port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                       opts=["--ca", kit.certs.ca], ready=False)
    cause = "the reverse proxy did not pass the WebSocket upgrade"
    poll(lambda: client.stderr_text().count(cause) >= 2, 15, "the explained refusal, twice (retrying)")
    assert client.proc.poll() is None, "the client gave up"


def test_idle_tunnel_survives_a_short_proxy_read_timeout_with_pings(kit, nginx):
    _, port = ws_server(kit, "ws")
    front = nginx(port, read_timeout="3s")
    client = ws_client(kit, f"wss://localhost:{front.port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                       opts=["--ca", kit.certs.ca, "--ws-ping", "1s"])
    (addr,) = client.exposed_map.values()
    time.sleep(10)  # the idle period under test, not a wait for readiness
    assert_echoed(addr, [os.urandom(256 * 1024)], timeout=10)
    log = client.stderr_text()
    assert "reconnecting" not in log and log.count("connected to server") == 1, log


# --------------------------------------------------------------------------
# through a corporate proxy


def test_through_an_http_proxy_with_basic_auth(kit, http_proxy):
    _, port = ws_server(kit, "ws")
    client = ws_client(kit, f"ws://127.0.0.1:{port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                       opts=["--proxy", f"http://alice:s3cret@127.0.0.1:{http_proxy}"])
    (addr,) = client.exposed_map.values()
    assert_echoed(addr, [os.urandom(2 * MiB)], timeout=30)


def test_a_wrong_proxy_password_is_a_clear_error(kit, http_proxy):
    _, port = ws_server(kit, "ws")
    client = ws_client(kit, f"ws://127.0.0.1:{port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                       opts=["--proxy", f"http://alice:wrong@127.0.0.1:{http_proxy}"], ready=False)
    assert client.wait_exit_code(15) == 1
    assert "refused the user name or password given in --proxy" in client.stderr_text()
