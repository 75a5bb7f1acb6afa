"""Tunnel connections over WebSocket end without resets (issue 15).

Two faults made visitors of a ws tunnel see ConnectionResetError with no bytes back:
- the inner TLS half-closed with a TCP FIN under the WebSocket as well as the close
  frame; nginx ends an upgraded connection at the first FIN from either side, so behind
  nginx every echo through a dedicated data channel (`--mux 0`) was cut off;
- a channel closed with the peer's close frame unread in the socket, or the close frame
  arrived after the close (the peer sent it apart from its close_notify), either of
  which sends RST; the peer's relay saw the error and dropped the echo it had not read
  yet (intermittent, more often on a loaded machine).
Each round echoes several visitors at once, one 64 KiB like the CI failure; the logs of
both ends must show no connection that ended in a reset."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tunnel_support import TunnelKit, assert_echoed, free_port, poll
from ws_support import NGINX

ROUNDS = 8


class PlainNginx:
    """nginx in the foreground as a plain-HTTP reverse proxy for WebSocket upgrades on
    /tunnel, in front of `upstream`."""

    def __init__(self, prefix: Path, upstream: int):
        (prefix / "logs").mkdir(parents=True)
        self.port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    server {{
        listen 127.0.0.1:{self.port};
        location /tunnel {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
        }}
    }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf),
                                      "-g", f"daemon off; pid {prefix}/nginx.pid;"],
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
def plain_nginx(tmp_path):
    if NGINX is None:
        pytest.skip("nginx not installed")
    started: list[PlainNginx] = []

    def start(upstream: int) -> PlainNginx:
        n = PlainNginx(tmp_path / f"nginx-{upstream}", upstream)
        started.append(n)
        return n

    yield start
    for n in started:
        n.close()


def echo_rounds(kit: TunnelKit, port: int, mux: list[str]) -> None:
    """A ws server and a client of it through `port` (the server's, or nginx's in front);
    `ROUNDS` rounds of simultaneous echoes, then no reset in either log."""
    client = kit.start_client(f"ws://127.0.0.1:{port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                              mode_args=[], opts=["--threads", "2", *mux], ready=False)
    (addr,) = client.exposed(1).values()
    for _ in range(ROUNDS):
        assert_echoed(addr, [os.urandom(64 * 1024) for _ in range(4)] + [b"x", os.urandom(65537), os.urandom(300_000)],
                      timeout=30)
    server = kit.procs[0]
    for name, proc in (("server", server), ("client", client)):
        resets = [line for line in proc.stderr_text().splitlines() if "reason=reset" in line]
        assert not resets, f"{name}: {resets[:3]}"


def ws_server(kit: TunnelKit) -> int:
    return kit.start_server("tls-psk", ["--transport", "ws", "--ws-path", "/tunnel", "--threads", "2"]).server_addr[1]


@pytest.mark.parametrize("mux", [["--mux", "0"], []], ids=["dedicated", "mux"])
def test_echoes_behind_nginx_come_back_whole(kit, plain_nginx, mux):
    front = plain_nginx(ws_server(kit))
    echo_rounds(kit, front.port, mux)


@pytest.mark.parametrize("mux", [["--mux", "0"], []], ids=["dedicated", "mux"])
def test_echoes_straight_to_the_server_end_without_resets(kit, mux):
    echo_rounds(kit, ws_server(kit), mux)
