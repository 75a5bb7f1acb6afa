"""SIGHUP reload of `forward -c`, `server -c` and `client -c`, and `culvert check`.

A reload applies the difference of the re-read file: listeners/services added start,
removed ones stop accepting while their connections finish, everything else (and every
live connection) is untouched; a bad file keeps the running config and logs one line.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket

import pytest

from conftest import Culvert, EchoServer, recv_exactly, round_trip
from tunnel_support import clean_env, connect_refused, free_port, poll, run_cli

KiB = 1024
CHUNK = 256 * KiB


def forward_file(path, listeners: dict[int, int], extra: str = "") -> None:
    """A forward tcp config: one [services.pPORT] table per listen port -> target port."""
    text = extra
    for port, target in listeners.items():
        text += f'[services.p{port}]\nlisten = "127.0.0.1:{port}"\ntargets = ["127.0.0.1:{target}"]\n'
    path.write_text(text)


def hup_and_wait(proc: Culvert, message: str, count: int) -> None:
    """Sends SIGHUP and waits for the `count`-th reload outcome line matching `message`."""
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_stderr(message, timeout=15, count=count)


class Transfer:
    """One echo connection whose bytes are hashed both ways, sent in two halves."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()

    def pump(self, chunks: int) -> None:
        for i in range(chunks):
            block = os.urandom(CHUNK)
            self.sent.update(block)
            self.sock.sendall(block)
            self.got.update(recv_exactly(self.sock, CHUNK))

    def finish(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        assert self.sock.recv(1) == b"", "echo sent bytes after the end"
        self.sock.close()
        assert self.sent.hexdigest() == self.got.hexdigest()


def test_forward_reload_adds_and_drains_listeners_without_dropping(culvert_path, tmp_path):
    echo = EchoServer()
    try:
        kept, removed, added = free_port(), free_port(), free_port()
        cfg = tmp_path / "forward.toml"
        forward_file(cfg, {kept: echo.port, removed: echo.port})
        p = Culvert(culvert_path, ["forward", "tcp", "-c", str(cfg), "--threads", "2"])
        try:
            p.wait_ready(2)
            live = Transfer(removed)
            other = socket.create_connection(("127.0.0.1", kept), timeout=10)
            round_trip(other, b"before")
            live.pump(16)

            forward_file(cfg, {kept: echo.port, added: echo.port})
            hup_and_wait(p, r"config reloaded", 1)
            line = p.stderr_matching(r"config reloaded")[0]
            assert f"added=\"tcp 127.0.0.1:{added}\"" in line and f"removed=\"tcp 127.0.0.1:{removed}\"" in line, line
            p.wait_stdout(re.compile(rf"^listening tcp 127\.0\.0\.1:{added} -> 127\.0\.0\.1:{echo.port}$"))

            # The removed listener's live connection completes, SHA-checked; new ones are refused.
            live.pump(16)
            live.finish()
            assert poll(lambda: connect_refused(("127.0.0.1", removed)), 5, "the removed listener to refuse")
            # The kept listener's connection was not touched; the added one serves.
            round_trip(other, b"after")
            other.close()
            with socket.create_connection(("127.0.0.1", added), timeout=10) as s:
                round_trip(s, b"new listener")

            # A bad file keeps everything running and says file and key in one line.
            cfg.write_text("max_conections = 3\n" + cfg.read_text())
            hup_and_wait(p, r"config reload failed", 1)
            bad = p.stderr_matching(r"config reload failed")
            assert len(bad) == 1 and str(cfg) in bad[0] and "max_conections: unknown key" in bad[0], bad
            assert "key=max_conections" in bad[0], bad[0]
            for port in (kept, added):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    round_trip(s, b"still serving")
            assert p.terminate() == 0
        finally:
            p.kill()
    finally:
        echo.close()


def client_file(path, server, token_file: str, services: dict[str, str]) -> None:
    text = f'server = "127.0.0.1:{server[1]}"\ntoken_file = "{token_file}"\n'
    for name, body in services.items():
        text += f"[services.{name}]\n{body}\n"
    path.write_text(text)


def test_client_reload_exposes_and_removes_services_on_the_live_session(kit, tmp_path):
    one, two = kit.echo(), kit.echo()
    server = kit.start_server()
    cfg = tmp_path / "client.toml"
    svc_one = f'remote_port = 0\nlocal = "127.0.0.1:{one.port}"'
    svc_two = f'remote_port = 0\nlocal = "127.0.0.1:{two.port}"'
    client_file(cfg, server.server_addr, kit.token_file, {"one": svc_one})
    client = kit.spawn(["client", "-c", str(cfg)])
    exposed_one = client.exposed(1)[f"127.0.0.1:{one.port}"]
    kept = socket.create_connection(exposed_one, timeout=10)
    round_trip(kept, b"before reload")

    client_file(cfg, server.server_addr, kit.token_file, {"one": svc_one, "two": svc_two})
    hup_and_wait(client, r"config reloaded", 1)
    exposed_two = client.exposed(2)[f"127.0.0.1:{two.port}"]
    with socket.create_connection(exposed_two, timeout=10) as s:
        round_trip(s, b"added service")
    round_trip(kept, b"the session stayed up")

    # Removing the service closes its public port; its running visitor goes on.
    client_file(cfg, server.server_addr, kit.token_file, {"two": svc_two})
    hup_and_wait(client, r"config reloaded", 2)
    assert poll(lambda: connect_refused(exposed_one), 10, "the removed service's port to close")
    round_trip(kept, b"still relayed after removal")
    kept.close()
    with socket.create_connection(exposed_two, timeout=10) as s:
        round_trip(s, b"other service untouched")
    assert "client disconnected" not in server.stderr_text()


def test_client_reload_reports_proxy_and_limit_keys_as_restart_only(kit, tmp_path):
    """Keys a live client cannot change (visitor limits, -D, exit policy) are named, not
    silently ignored."""
    one = kit.echo()
    server = kit.start_server()
    cfg = tmp_path / "client.toml"
    svc = f'remote_port = 0\nlocal = "127.0.0.1:{one.port}"'
    client_file(cfg, server.server_addr, kit.token_file, {"one": svc})
    client = kit.spawn(["client", "-c", str(cfg)])
    client.exposed(1)
    text = cfg.read_text()
    cfg.write_text('max_visitors = 7\nexit_deny = ["10.0.0.0/8"]\n' + text)
    hup_and_wait(client, r"config reloaded", 1)
    restart = client.stderr_matching(r"needs a restart")
    assert any("key=max_visitors" in line for line in restart), client.describe()
    assert any("key=exit_deny" in line for line in restart), client.describe()


def test_server_reload_applies_port_policy_and_reports_restart_only_keys(kit, tmp_path):
    echo = kit.echo()
    allowed, later = free_port(), free_port()
    scfg = tmp_path / "server.toml"
    base = f'listen = "127.0.0.1:0"\ntoken_file = "{kit.token_file}"\nbind_addr = "127.0.0.1"\n'
    scfg.write_text(base + f'allow_ports = "{allowed}"\n')
    server = kit.spawn(["server", "-c", str(scfg)])
    server.server_addr = server.listen_addrs(1)[0]
    ccfg = tmp_path / "client.toml"
    first = f'remote_port = {allowed}\nlocal = "127.0.0.1:{echo.port}"'
    second = f'remote_port = {later}\nlocal = "127.0.0.1:{echo.port}"'
    client_file(ccfg, server.server_addr, kit.token_file, {"first": first})
    client = kit.spawn(["client", "-c", str(ccfg)])
    client.exposed(1)
    live = socket.create_connection(("127.0.0.1", allowed), timeout=10)
    round_trip(live, b"first")

    # A service the policy refuses, added by a reload, is logged, not fatal.
    client_file(ccfg, server.server_addr, kit.token_file, {"first": first, "second": second})
    hup_and_wait(client, r"config reloaded", 1)
    client.wait_stderr(r"server refused service second", timeout=10)
    assert client.proc.poll() is None

    # The server's reload allows the port; the client's retry then gets it.
    scfg.write_text(base + f'allow_ports = "{allowed},{later}"\nmax_unauthenticated = 7\n')
    hup_and_wait(server, r"config reloaded", 1)
    assert "applied=allow_ports" in server.stderr_matching(r"config reloaded")[0]
    restart = server.stderr_matching(r"needs a restart")
    assert len(restart) == 1 and "key=max_unauthenticated" in restart[0], restart
    client.wait_stdout(re.compile(rf"^exposed tcp \S+:{later} -> 127\.0\.0\.1:{echo.port}$"), timeout=15)
    with socket.create_connection(("127.0.0.1", later), timeout=10) as s:
        round_trip(s, b"allowed after reload")
    round_trip(live, b"untouched")
    live.close()


@pytest.fixture
def check(culvert_path, tmp_path):
    def run(text: str, *extra: str):
        path = tmp_path / "check.toml"
        path.write_text(text)
        return path, run_cli(["check", "-c", str(path), *extra], env=clean_env())
    return run


def test_check_good_files_print_what_would_run(check, kit):
    path, r = check(f'listen = "127.0.0.1:7001"\ntoken_file = "{kit.token_file}"\nallow_ports = "20000-20100"\n')
    assert r.returncode == 0, r.stderr
    assert f"config {path}: ok" in r.stdout and "server: listen 127.0.0.1:7001" in r.stdout and "allow_ports 20000-20100" in r.stdout

    path, r = check(f'server = "example.net"\ntoken_file = "{kit.token_file}"\n[services.ssh]\nremote_port = 2222\nlocal = "127.0.0.1:22"\n')
    assert r.returncode == 0, r.stderr
    assert "client: server example.net:7000" in r.stdout and "tcp port 2222 -> 127.0.0.1:22 (ssh)" in r.stdout

    path, r = check('listen = "127.0.0.1:8080"\ntargets = ["127.0.0.1:9000", "127.0.0.1:9001"]\nmax_connections = 9\n')
    assert r.returncode == 0, r.stderr
    assert "forward tcp: 1 listener(s)" in r.stdout and "tcp 127.0.0.1:8080 -> 127.0.0.1:9000,127.0.0.1:9001" in r.stdout
    assert "max_connections 9" in r.stdout

    path, r = check('protocol = "udp"\n[services.dns]\nlisten = "127.0.0.1:5353"\ntargets = "127.0.0.1:53"\n')
    assert r.returncode == 0, r.stderr
    assert "forward udp: 1 listener(s)" in r.stdout and "udp 127.0.0.1:5353 -> 127.0.0.1:53" in r.stdout

    path, r = check('listen = "127.0.0.1:8080"\n', "--kind", "server")
    assert r.returncode == 2 and "no token" in r.stderr, r.stderr


@pytest.mark.parametrize("text,key,what", [
    ('listen = "127.0.0.1:7001"\nmax_client = 3\n', "max_client", "unknown key"),
    ('server = "h"\ntoken = "x"\n[services.a]\nlocal = "127.0.0.1:22"\n', "services.a.remote_port", "missing"),
    ('listen = "127.0.0.1:8080"\ntargets = ["127.0.0.1:9"]\nbalance = "fastest"\n', "balance", "is not round-robin"),
    ('protocol = "udp"\nlisten = "127.0.0.1:53"\ntargets = "127.0.0.1:9"\nmax_sessions = -1\n', "max_sessions", "out of range"),
    ('listen = "127.0.0.1:8080"\ntargets = [\n', None, "line"),
])
def test_check_bad_files_exit_2_naming_file_and_key(check, text, key, what):
    path, r = check(text)
    assert r.returncode == 2, (r.stdout, r.stderr)
    expected = f"config {path}: {key}: " if key else f"config {path}: "
    assert expected in r.stderr and what in r.stderr, r.stderr
    assert r.stdout == ""
