"""Clear messages (issue 13): a tunnel end that stops on purpose says goodbye, so the
other end logs one info line and no warning for the channels that go with it, while a
real fault stays a warning; refusals of every kind are summarised, never one line per
connection; and the client prints its ready lines only once every service is accepted."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from tunnel_support import assert_echoed, hello, local_of, poll, read_frame

# Warnings every server or client of a given mode prints at start, whatever happens later.
START_WARNINGS = r"transport is plain"
REFUSAL_LINE = (r"handshake failed|authentication failed|client refused|connection refused|connection dropped"
                r"|data channel rejected|cannot set up connection|accept failed|unauthenticated connections refused")


def warnings(proc) -> list[str]:
    return [l for l in proc.stderr_matching(r"^warning ") if not re.search(START_WARNINGS, l)]


def quiet_for(proc, seconds: float) -> None:
    """Gives late lines (a carrier's close report, a summary) time to show up."""
    time.sleep(seconds)


def start_pair(kit, mode: str, client_opts: list[str]):
    echo = kit.echo()
    srv = kit.start_server(mode)
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], mode, opts=client_opts)
    addr = cli.exposed_map[local_of(echo)]
    assert_echoed(addr, [os.urandom(64 * 1024)], timeout=10)
    return srv, cli


# --------------------------------------------------------------------------
# clean ends


@pytest.mark.parametrize("mode,client_opts", [
    ("tls-psk", []), ("plain", ["--mux", "2"]), ("tls-psk", ["--mux", "0", "--pool", "2"]),
])
def test_client_stop_is_one_info_line_on_the_server(kit, mode, client_opts):
    srv, cli = start_pair(kit, mode, client_opts)
    cli.send_signal(signal.SIGTERM)
    assert cli.wait_exit(10) == 0, cli.describe()
    srv.wait_stderr(r"client disconnected", timeout=5)
    quiet_for(srv, 1.0)
    ends = srv.stderr_matching(r"client disconnected")
    assert len(ends) == 1 and re.match(r"^info client disconnected .*reason=stopped", ends[0]), srv.describe()
    assert warnings(srv) == [], srv.describe()
    assert warnings(cli) == [], cli.describe()


@pytest.mark.parametrize("mode,client_opts", [("tls-psk", []), ("plain", ["--mux", "0", "--pool", "2"])])
def test_server_stop_is_one_info_line_on_the_client(kit, mode, client_opts):
    srv, cli = start_pair(kit, mode, client_opts)
    srv.send_signal(signal.SIGTERM)
    assert srv.wait_exit(10) == 0, srv.describe()
    cli.wait_stderr(r"reconnecting", timeout=5)
    ends = cli.stderr_matching(r"disconnected from server|control channel lost|data channel lost")
    assert len(ends) == 1 and re.match(r'^info disconnected from server reason="server shutting down"', ends[0]), \
        cli.describe()
    # Until the server is gone (the reconnect attempts then fail, rightly as warnings).
    before = cli.stderr_lines[:next(i for i, l in enumerate(cli.stderr_lines) if "reconnecting" in l)]
    assert [l for l in before if l.startswith("warning ") and not re.search(START_WARNINGS, l)] == [], cli.describe()
    assert re.search(r'^info client disconnected .*reason="server shutting down"', "\n".join(srv.stderr_lines), re.M), \
        srv.describe()
    assert warnings(srv) == [], srv.describe()


def test_killed_client_is_still_a_warning(kit):
    srv, cli = start_pair(kit, "tls-psk", [])
    cli.proc.kill()
    cli.wait_exit(10)
    line = srv.wait_stderr(r"client disconnected", timeout=5)[0]
    assert line.startswith("warning "), srv.describe()


# --------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("mode", ["plain", "tls-cert"])
def test_client_with_another_token_is_one_authentication_line(kit, mode):
    srv = kit.start_server(mode)
    wrong = kit.write_token(kit.token[::-1], "wrong-token")
    cli = kit.start_client(srv.server_addr, ["0:127.0.0.1:9"], mode, token_file=wrong, ready=False)
    assert cli.wait_exit(10) == 1, cli.describe()
    srv.wait_stderr(r"authentication failed", timeout=5)
    quiet_for(srv, 0.5)
    assert srv.stderr_matching(r"handshake failed") == [], srv.describe()
    assert len(srv.stderr_matching(REFUSAL_LINE)) == 1, srv.describe()


def _garbage(sock: socket.socket, i: int) -> None:
    """One of several ways to fail the handshake of a plain server."""
    kind = i % 3
    if kind == 0:
        sock.sendall(os.urandom(64))
    elif kind == 1:
        # Another protocol version: the server refuses it with a reason.
        sock.sendall(hello(os.urandom(32), version=3))
        read_frame(sock, time.monotonic() + 5)
    else:
        # A peer that hangs up once it has the server's challenge.
        sock.sendall(hello(os.urandom(32)))
        read_frame(sock, time.monotonic() + 5)


def test_flood_of_failing_handshakes_is_a_handful_of_lines(kit):
    srv = kit.start_server("plain")
    host, port = srv.server_addr
    sources = [f"127.0.0.{i}" for i in range(2, 52)]
    total = 500
    for i in range(total):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.bind((sources[i % len(sources)], 0))
            s.connect((host, port))
            _garbage(s, i)
        except OSError:
            pass
        finally:
            s.close()
    # Every refusal is accounted for: the detailed lines plus the summaries' counts.
    def accounted() -> int:
        n = 0
        for line in srv.stderr_matching(REFUSAL_LINE):
            if "connections refused" in line:
                n += sum(int(v) for k, v in (f.split("=", 1) for f in line.split()[1:] if "=" in f) if v.isdigit())
            else:
                n += 1
        return n
    poll(lambda: accounted() >= total, 10, f"{total} refusals accounted for")
    lines = srv.stderr_matching(REFUSAL_LINE)
    assert len(lines) <= 15, f"{len(lines)} lines for {total} refusals\n" + "\n".join(lines[:40])
    # The server still takes a real client at once.
    echo = kit.echo()
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], "plain")
    assert_echoed(cli.exposed_map[local_of(echo)], [b"still serving"], timeout=10)


def test_descriptor_shortage_on_accept_is_summarised(kit, tmp_path):
    """A server out of descriptors fails every accept (retried every 100 ms): counted."""
    args = ["server", "--listen", "127.0.0.1:0", "--bind-addr", "127.0.0.1", "--token-file", kit.token_file,
            "--transport", "plain", "--threads", "1", "--handshake-timeout", "4s"]
    srv = kit.spawn(args, prefix=["prlimit", "--nofile=48:48"])
    host, port = srv.listen_addrs(1)[0]
    held = []
    try:
        # Silent connections from many addresses (under the per-address cap) use up
        # the server's descriptors; the rest wait in the backlog, accept failing.
        for i in range(80):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((f"127.0.0.{2 + i // 4}", 0))
            s.setblocking(False)
            s.connect_ex((host, port))
            held.append(s)
        srv.wait_stderr(r"accept failed", timeout=5)
        time.sleep(2.5)
        lines = srv.stderr_matching(REFUSAL_LINE)
        assert len(lines) <= 10, f"{len(lines)} lines\n" + "\n".join(lines[:40])
        assert srv.stderr_matching(r"unauthenticated connections refused .*accept_failed=\d+"), srv.describe()
    finally:
        for s in held:
            s.close()


# --------------------------------------------------------------------------
# ready lines


def test_no_ready_line_when_a_service_is_refused(kit):
    echo = kit.echo()
    srv = kit.start_server("tls-psk")
    services = [f"0:{local_of(echo)}" for _ in range(40)]   # the default limit is 32
    cli = kit.start_client(srv.server_addr, services, "tls-psk", ready=False)
    assert cli.wait_exit(10) == 1, cli.describe()
    assert [l for l in cli.stdout_lines if l.startswith("exposed")] == [], cli.describe()
    assert re.search(r"^culvert: server refused service 0:\S+: too many services \(limit 32\)$",
                     "\n".join(cli.stderr_lines), re.M), cli.describe()
    # The client said goodbye on its way out: no fault on the server.
    line = srv.wait_stderr(r"client disconnected", timeout=5)[0]
    assert line.startswith("info "), srv.describe()

