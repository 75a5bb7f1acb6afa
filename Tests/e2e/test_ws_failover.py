"""A client with several servers where entries are ws:// or wss:// URLs (issue 15 with
issue 16's failover): each entry brings its own transport and path, on the command line
(comma-separated) and in the config file (`servers = [...]`), and may sit beside a
HOST:PORT server on the client's --transport.

Server A exposes services on 127.0.0.2 and server B on 127.0.0.3 (`--bind-addr`), so the
`exposed` line names the server that holds the service. Every transfer is checked by
SHA-256; every wait has a deadline."""

from __future__ import annotations

import os
import re

from conftest import MiB, parse_addr
from tunnel_support import TunnelKit, assert_echoed, free_port, poll

HEARTBEAT = ["--heartbeat-interval", "500ms", "--heartbeat-misses", "2"]
CLIENT_OPTS = [*HEARTBEAT, "--reconnect-max", "1s", "--failback-interval", "1s", "--threads", "2"]
BIND = {"127.0.0.2": "A", "127.0.0.3": "B"}
EXPOSED_RE = re.compile(r"^exposed tcp (\S+) -> (\S+)$")


def start_server(kit: TunnelKit, port: int, bind: str, transport: str, path: str | None = None):
    args = ["server", "--listen", f"127.0.0.1:{port}", "--bind-addr", bind, "--token-file", kit.token_file,
            "--transport", transport, "--threads", "2", *HEARTBEAT]
    if path:
        args += ["--ws-path", path]
    if transport == "wss":
        args += ["--cert", kit.certs.cert, "--key", kit.certs.key]
    p = kit.spawn(args)
    p.listen_addrs(1)
    return p


def exposed_lines(client) -> list[tuple[str, tuple[str, int]]]:
    """(server name, address) of each exposed line so far."""
    with client._cond:
        lines = list(client.stdout_lines)
    out = []
    for line in lines:
        m = EXPOSED_RE.match(line)
        if m:
            addr = parse_addr(m.group(1))
            out.append((BIND[addr[0]], addr))
    return out


def wait_exposed_on(client, server: str, after: int, timeout: float = 15.0) -> tuple[str, int]:
    def found():
        return next((a for s, a in exposed_lines(client)[after:] if s == server), None)
    return poll(found, timeout, f"an exposed line naming server {server}")


def test_failover_between_ws_and_wss_servers_each_with_its_own_path(kit):
    echo = kit.echo()
    ports = {"A": free_port(), "B": free_port()}
    a = start_server(kit, ports["A"], "127.0.0.2", "ws", "/a")
    start_server(kit, ports["B"], "127.0.0.3", "wss", "/b")
    servers = f"ws://127.0.0.1:{ports['A']}/a,wss://localhost:{ports['B']}/b"
    client = kit.spawn(["client", servers, "-R", f"0:127.0.0.1:{echo.port}", "--token-file", kit.token_file,
                        "--ca", kit.certs.ca, *CLIENT_OPTS])
    on_a = wait_exposed_on(client, "A", 0)
    assert_echoed(on_a, [os.urandom(2 * MiB)], timeout=30)

    seen = len(exposed_lines(client))
    a.kill()
    on_b = wait_exposed_on(client, "B", seen)
    assert_echoed(on_b, [os.urandom(2 * MiB)], timeout=30)

    seen = len(exposed_lines(client))
    start_server(kit, ports["A"], "127.0.0.2", "ws", "/a")
    back = wait_exposed_on(client, "A", seen)
    assert_echoed(back, [os.urandom(1 * MiB)], timeout=30)
    log = client.stderr_text()
    # "HTTP 404" as the client words a refusal; a bare "404" also matches a port number.
    assert not re.search(r"HTTP 404|no WebSocket endpoint|certificate", log), "each server was asked on its own path and transport"


def test_config_file_list_falls_from_a_dead_ws_server_to_a_live_one(kit, tmp_path):
    echo = kit.echo()
    dead, live = free_port(), free_port()
    start_server(kit, live, "127.0.0.3", "ws", "/live")
    cfg = tmp_path / "client.toml"
    cfg.write_text(f'servers = ["ws://127.0.0.1:{dead}/dead", "ws://127.0.0.1:{live}/live"]\n'
                   f'token_file = "{kit.token_file}"\nws_ping = "1s"\n'
                   f'[services.echo]\nremote_port = 0\nlocal = "127.0.0.1:{echo.port}"\n')
    client = kit.spawn(["client", "-c", str(cfg), *CLIENT_OPTS])
    on_b = wait_exposed_on(client, "B", 0)
    assert_echoed(on_b, [os.urandom(2 * MiB)], timeout=30)
    assert f"127.0.0.1:{dead}" in client.stderr_text(), "the dead server was tried first"


def test_a_ws_server_backs_up_a_tls_server_in_one_list(kit):
    """HOST:PORT entries keep the client's transport (TLS with the token's PSK) while a
    URL entry travels in a WebSocket."""
    echo = kit.echo()
    ports = {"A": free_port(), "B": free_port()}
    a = start_server(kit, ports["A"], "127.0.0.2", "tls")
    start_server(kit, ports["B"], "127.0.0.3", "ws", "/t")
    client = kit.spawn(["client", f"127.0.0.1:{ports['A']},ws://127.0.0.1:{ports['B']}/t", "-R", f"0:127.0.0.1:{echo.port}",
                        "--token-file", kit.token_file, *CLIENT_OPTS])
    assert_echoed(wait_exposed_on(client, "A", 0), [os.urandom(1 * MiB)], timeout=30)
    seen = len(exposed_lines(client))
    a.kill()
    assert_echoed(wait_exposed_on(client, "B", seen), [os.urandom(1 * MiB)], timeout=30)
