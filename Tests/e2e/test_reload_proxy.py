"""SIGHUP reload of a `client -c` whose file adds or removes proxies through the tunnel.

A `reverse_proxy` (`-R proxy:`) added to a client that already runs one is exposed on the
live session and serves; removed, its port closes. One the running client cannot serve
(it started without a reverse proxy, or its running auth settings would leave the new
bind open) is not exposed and named in one `needs a restart` line, as is a changed
`dynamic` (`-D`). Nothing is silently ignored.

Loopback only; every wait is bounded (ready lines, polls)."""

from __future__ import annotations

import re
import signal
import socket
import struct

from conftest import parse_addr, recv_exactly, round_trip
from proxy_support import EXPOSED_PROXY_RE
from tunnel_support import connect_refused, free_port, poll


def client_file(path, server, token_file: str, reverse: list[str] = (), extra: str = "") -> None:
    text = f'server = "127.0.0.1:{server[1]}"\ntoken_file = "{token_file}"\ntransport = "plain"\n{extra}'
    if reverse:
        text += "reverse_proxy = [" + ", ".join(f'"{r}"' for r in reverse) + "]\n"
    path.write_text(text)


def reload_and_wait(proc, count: int) -> None:
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_stderr(r"config reloaded", timeout=15, count=count)


def socks_round_trip(proxy: tuple[str, int], target_port: int, payload: bytes) -> None:
    """A SOCKS5 CONNECT through `proxy` to the echo on 127.0.0.1:`target_port`, one round trip."""
    with socket.create_connection(proxy, timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exactly(s, 2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", target_port))
        assert recv_exactly(s, 10)[1] == 0
        round_trip(s, payload)


def restart_keys(proc) -> list[str]:
    return [m.group(1) for line in proc.stderr_matching(r"needs a restart") if (m := re.search(r"key=(\S+)", line))]


def test_reverse_proxy_added_and_removed_on_a_client_that_runs_one(kit, tmp_path):
    echo = kit.echo()
    server = kit.start_server("plain")
    first, second = free_port(), free_port()
    cfg = tmp_path / "client.toml"
    client_file(cfg, server.server_addr, kit.token_file, [f"127.0.0.1:{first}"])
    client = kit.spawn(["client", "-c", str(cfg)])
    one = parse_addr(client.wait_stdout(EXPOSED_PROXY_RE)[0].group(1))
    socks_round_trip(one, echo.port, b"before reload")

    client_file(cfg, server.server_addr, kit.token_file, [f"127.0.0.1:{first}", f"127.0.0.1:{second}"])
    reload_and_wait(client, 1)
    two = parse_addr(client.wait_stdout(EXPOSED_PROXY_RE, count=2)[1].group(1))
    assert two == ("127.0.0.1", second)
    socks_round_trip(two, echo.port, b"added by the reload")
    assert restart_keys(client) == [], client.describe()

    client_file(cfg, server.server_addr, kit.token_file, [f"127.0.0.1:{second}"])
    reload_and_wait(client, 2)
    assert poll(lambda: connect_refused(one), 10, "the removed reverse proxy's port to close")
    socks_round_trip(two, echo.port, b"the other one still serves")
    assert restart_keys(client) == [], client.describe()


def test_reverse_proxy_added_to_a_client_started_without_one_is_named_as_needing_a_restart(kit, tmp_path):
    server = kit.start_server("plain")
    port = free_port()
    cfg = tmp_path / "client.toml"
    client_file(cfg, server.server_addr, kit.token_file, extra='dynamic = ["127.0.0.1:0"]\n')
    client = kit.spawn(["client", "-c", str(cfg)])
    client.wait_stdout(re.compile(r"^listening proxy \S+$"))

    client_file(cfg, server.server_addr, kit.token_file, [f"127.0.0.1:{port}"])
    reload_and_wait(client, 1)
    assert sorted(restart_keys(client)) == ["dynamic", "reverse_proxy"], client.describe()
    assert connect_refused(("127.0.0.1", port))
    assert not [line for line in client.stdout_lines if line.startswith("exposed proxy")]


def test_reverse_proxy_the_running_auth_would_leave_open_waits_for_a_restart(kit, tmp_path):
    """The new file gives an auth file for a proxy on 0.0.0.0, but the running client
    has none (proxy_auth_file needs a restart): exposing it now would serve it open."""
    server = kit.start_server("plain", opts=["--bind-addr", "0.0.0.0"])
    kept, open_port = free_port(), free_port()
    auth = tmp_path / "users"
    auth.write_text("alice:secret\n")
    cfg = tmp_path / "client.toml"
    client_file(cfg, server.server_addr, kit.token_file, [f"127.0.0.1:{kept}"])
    client = kit.spawn(["client", "-c", str(cfg)])
    client.wait_stdout(EXPOSED_PROXY_RE)

    client_file(cfg, server.server_addr, kit.token_file, [f"127.0.0.1:{kept}", f"0.0.0.0:{open_port}"],
                extra=f'proxy_auth_file = "{auth}"\n')
    reload_and_wait(client, 1)
    assert sorted(restart_keys(client)) == ["proxy_auth_file", "reverse_proxy"], client.describe()
    assert connect_refused(("127.0.0.1", open_port))
    assert len([line for line in client.stdout_lines if line.startswith("exposed proxy")]) == 1
