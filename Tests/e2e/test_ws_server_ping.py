"""The server's WebSocket keepalive (`culvert server --ws-ping`): behind an nginx that
cuts connections idle for 3 s, a client whose own pings are off keeps its tunnel
because the server pings each WebSocket on the loop that ends up owning it (control
channel, carriers, relayed data channels); with the server's pings off too, nginx cuts it."""

from __future__ import annotations

import os
import time

from tunnel_support import assert_echoed, poll
from ws_support import ws_client, ws_server


def start_idle_tunnel(kit, nginx, server_ping: str):
    _, port = ws_server(kit, "ws", opts=["--ws-ping", server_ping])
    front = nginx(port, read_timeout="3s")
    client = ws_client(kit, f"wss://localhost:{front.port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                       opts=["--ca", kit.certs.ca, "--ws-ping", "off"])
    (addr,) = client.exposed_map.values()
    return client, addr


def test_server_pings_keep_an_idle_tunnel_behind_a_short_proxy_read_timeout(kit, nginx):
    client, addr = start_idle_tunnel(kit, nginx, "1s")
    assert_echoed(addr, [os.urandom(64 * 1024)], timeout=10)
    time.sleep(10)  # the idle period under test, not a wait for readiness
    assert_echoed(addr, [os.urandom(256 * 1024)], timeout=10)
    log = client.stderr_text()
    assert "reconnecting" not in log and log.count("connected to server") == 1, log


def test_without_pings_on_either_end_nginx_cuts_the_idle_tunnel(kit, nginx):
    client, _ = start_idle_tunnel(kit, nginx, "off")
    poll(lambda: "reconnecting" in client.stderr_text(), 15, "the client reconnecting after nginx cut its idle tunnel")
