"""Where two of the merged features meet: a tunnel client's reload with its visitor
limits and its admin endpoint.

Every wait has a deadline; transfers are checked by their bytes.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import urllib.request

from conftest import parse_addr, round_trip
from tunnel_support import poll

ADMIN_RE = re.compile(r"^listening admin (\S+)$")


def client_file(path, server, token_file: str, services: dict[str, int], extra: str = "") -> None:
    """A client config: one [services.NAME] per local echo port, remote port picked by the server."""
    text = f'server = "127.0.0.1:{server[1]}"\ntoken_file = "{token_file}"\n{extra}'
    for name, local in services.items():
        text += f'[services.{name}]\nremote_port = 0\nlocal = "127.0.0.1:{local}"\n'
    path.write_text(text)


def reload(client, count: int) -> None:
    client.proc.send_signal(signal.SIGHUP)
    client.wait_stderr(r"config reloaded", timeout=15, count=count)


def closed_without_echo(addr: tuple[str, int]) -> bool:
    """True when a visitor to `addr` is closed (or reset) instead of echoed."""
    with socket.create_connection(addr, timeout=10) as s:
        try:
            s.sendall(b"refused?")
            return s.recv(64) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def test_service_added_by_reload_has_the_visitor_limit(kit, tmp_path):
    one, two = kit.echo(), kit.echo()
    server = kit.start_server()
    cfg = tmp_path / "client.toml"
    client_file(cfg, server.server_addr, kit.token_file, {"one": one.port}, extra="max_visitors = 1\n")
    client = kit.spawn(["client", "-c", str(cfg)])
    client.exposed(1)

    client_file(cfg, server.server_addr, kit.token_file, {"one": one.port, "two": two.port}, extra="max_visitors = 1\n")
    reload(client, 1)
    exposed_two = client.exposed(2)[f"127.0.0.1:{two.port}"]
    holder = socket.create_connection(exposed_two, timeout=10)
    try:
        round_trip(holder, b"first visitor holds the only place")
        assert closed_without_echo(exposed_two), "a second visitor went past max_visitors = 1"
        client.wait_stderr(r"visitors refused: service at its limit.*two", timeout=10)
        round_trip(holder, b"the first one goes on")
    finally:
        holder.close()


def test_admin_status_shows_the_port_of_a_service_added_by_reload(kit, tmp_path):
    one, two = kit.echo(), kit.echo()
    server = kit.start_server()
    cfg = tmp_path / "client.toml"
    client_file(cfg, server.server_addr, kit.token_file, {"one": one.port})
    client = kit.spawn(["client", "-c", str(cfg), "--admin", "127.0.0.1:0"])
    client.exposed(1)
    host, port = parse_addr(client.wait_stdout(ADMIN_RE)[0].group(1))

    client_file(cfg, server.server_addr, kit.token_file, {"one": one.port, "two": two.port})
    reload(client, 1)
    exposed_two = client.exposed(2)[f"127.0.0.1:{two.port}"]

    def ports():
        with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=5) as response:
            status = json.loads(response.read())
        return {s["name"]: s["ports"] for s in status["services"]}

    assert poll(lambda: ports().get("two") == [f"{exposed_two[0]}:{exposed_two[1]}"], 10,
                "the added service's port in /status"), ports()
