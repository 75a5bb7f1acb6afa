"""Where two of the merged features meet: a tunnel client's reload with its visitor
limits and its admin endpoint, and failover with `-D`.

Every wait has a deadline; transfers are checked by their bytes.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import urllib.request

from conftest import parse_addr, round_trip
from tunnel_support import free_port, poll

EXPOSED_RE = re.compile(r"^exposed tcp (\S+) -> (\S+)$")
PROXY_RE = re.compile(r"^listening proxy (\S+)$")
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
    """True when a visitor to `addr` is closed (or reset) instead of echoed. The reset may
    come before connect() returns: the refusal can beat the connecting thread back."""
    try:
        with socket.create_connection(addr, timeout=10) as s:
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


def socks_connect(proxy: tuple[str, int], port: int) -> tuple[int, socket.socket]:
    """A SOCKS5 CONNECT to 127.0.0.1:`port`: the reply code and the open socket."""
    s = socket.create_connection(proxy, timeout=15)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", port))
    reply = b""
    while len(reply) < 10:
        chunk = s.recv(10 - len(reply))
        assert chunk, "proxy closed before its reply"
        reply += chunk
    return reply[1], s


def test_preferred_server_without_exits_does_not_stop_dynamic_through_the_serving_one(kit):
    """The client serves through B (an exit); A, preferred but no exit, comes back and
    answers useExit as a candidate, then cannot take over (B's session holds the port on
    the same address). -D goes on through B."""
    echo = kit.echo()
    ports = {"A": free_port(), "B": free_port()}
    b = kit.spawn(["server", "--listen", f"127.0.0.1:{ports['B']}", "--bind-addr", "127.0.0.1",
                   "--token-file", kit.token_file, "--allow-exit", "--exit-allow", "127.0.0.0/8"])
    b.listen_addrs(1)
    remote = free_port()
    client = kit.spawn(["client", f"127.0.0.1:{ports['A']},127.0.0.1:{ports['B']}", "--token-file", kit.token_file,
                        "-R", f"{remote}:127.0.0.1:{echo.port}", "-D", "127.0.0.1:0", "--threads", "1",
                        "--failback-interval", "1s", "--handshake-timeout", "2s", "--reconnect-max", "1s"])
    client.wait_stdout(EXPOSED_RE)
    proxy = parse_addr(client.wait_stdout(PROXY_RE)[0].group(1))
    code, s = socks_connect(proxy, echo.port)
    assert code == 0
    round_trip(s, b"through B")
    s.close()

    a = kit.spawn(["server", "--listen", f"127.0.0.1:{ports['A']}", "--bind-addr", "127.0.0.1",
                   "--token-file", kit.token_file])
    a.listen_addrs(1)
    client.wait_stderr(r"preferred server did not accept every service; staying", timeout=15)
    for i in range(3):
        code, s = socks_connect(proxy, echo.port)
        assert code == 0, f"-D refused ({code:#x}) while B, an exit, serves"
        round_trip(s, b"still through B %d" % i)
        s.close()
