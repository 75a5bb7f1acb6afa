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

import pytest

from tunnel_support import TunnelKit, assert_echoed
from ws_support import ws_client, ws_server

ROUNDS = 8


def ws_port(kit: TunnelKit) -> int:
    return ws_server(kit, "ws")[1]


def echo_rounds(kit: TunnelKit, port: int, mux: list[str]) -> None:
    """A ws server and a client of it through `port` (the server's, or nginx's in front);
    `ROUNDS` rounds of simultaneous echoes, then no reset in either log."""
    client = ws_client(kit, f"ws://127.0.0.1:{port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"], opts=mux)
    (addr,) = client.exposed_map.values()
    for _ in range(ROUNDS):
        assert_echoed(addr, [os.urandom(64 * 1024) for _ in range(4)] + [b"x", os.urandom(65537), os.urandom(300_000)],
                      timeout=30)
    server = kit.procs[0]
    for name, proc in (("server", server), ("client", client)):
        resets = [line for line in proc.stderr_text().splitlines() if "reason=reset" in line]
        assert not resets, f"{name}: {resets[:3]}"


@pytest.mark.parametrize("mux", [["--mux", "0"], []], ids=["dedicated", "mux"])
def test_echoes_behind_nginx_come_back_whole(kit, nginx, mux):
    front = nginx(ws_port(kit), tls=False)
    echo_rounds(kit, front.port, mux)


@pytest.mark.parametrize("mux", [["--mux", "0"], []], ids=["dedicated", "mux"])
def test_echoes_straight_to_the_server_end_without_resets(kit, mux):
    echo_rounds(kit, ws_port(kit), mux)
