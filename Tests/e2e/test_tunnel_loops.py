"""End-to-end tests for a tunnel spread over several event loops (`--threads N` on
`culvert server` and `culvert client`): sessions, carriers and dedicated data channels
on different loops, visitors handed to the loop of the channel they ride, and every
byte verified."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import MiB, echo_once
from tunnel_support import assert_echoed

THREADS = 3


_BLOCK = os.urandom(8 * MiB)


def payload(i: int) -> bytes:
    off = (i * 262_147) % (4 * MiB)
    return _BLOCK[off:off + 3 * MiB + i * 50_021]


def thread_bytes(pid: int) -> dict[int, int]:
    """Bytes each thread of a process moved through read/write-like calls (rchar + wchar
    of /proc/PID/task/TID/io): a count of work that, unlike CPU ticks, does not depend on
    how busy the machine is."""
    moved = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/io") as f:
                fields = dict(line.split(": ") for line in f.read().splitlines())
        except FileNotFoundError:
            continue  # a short-lived helper thread (name resolution) already gone
        moved[int(tid)] = int(fields["rchar"]) + int(fields["wchar"])
    return moved


def busy_threads(before: dict[int, int], after: dict[int, int], min_bytes: int) -> int:
    return sum(1 for tid, t in after.items() if t - before.get(tid, 0) >= min_bytes)


def verified_echo(addr, n: int) -> None:
    assert_echoed(addr, [payload(i) for i in range(n)], timeout=60)


@pytest.mark.parametrize("mode,mux", [("tls-psk", 3), ("plain", 3), ("tls-psk", 0)])
def test_one_client_spreads_over_loops(kit, mode, mux):
    """One client's carriers (or dedicated channels) land on several loops at both
    ends: during a verified bulk echo more than one loop thread of each process works."""
    echo = kit.echo()
    threads = ["--threads", str(THREADS)]
    srv = kit.start_server(mode, opts=threads)
    cli = kit.start_client(srv.server_addr, [f"0:127.0.0.1:{echo.port}"], mode, opts=[*threads, "--mux", str(mux)])
    addr = cli.exposed_map[f"127.0.0.1:{echo.port}"]
    echo_once(addr, b"warm-up")
    before = {"server": thread_bytes(srv.pid), "client": thread_bytes(cli.pid)}
    n = 24
    verified_echo(addr, n)
    after = {"server": thread_bytes(srv.pid), "client": thread_bytes(cli.pid)}
    for name in ("server", "client"):
        busy = busy_threads(before[name], after[name], min_bytes=4 * MiB)
        assert busy >= 2, f"{name}: only {busy} thread(s) worked: {before[name]} -> {after[name]}"
    srv.wait_stderr(r"connection closed .*reason=eof", count=n + 1, timeout=10)
    assert not srv.stderr_matching(r"multiplexed data channel lost|data channel rejected"), srv.describe()


def test_clients_on_several_loops_and_a_drain(kit):
    """Four clients, each a session on whichever loop accepted it, serve verified echoes
    at once; SIGTERM then drains every loop and the server exits 0."""
    threads = ["--threads", str(THREADS)]
    srv = kit.start_server("plain", opts=threads)
    echoes = [kit.echo() for _ in range(4)]
    clients = [kit.start_client(srv.server_addr, [f"0:127.0.0.1:{e.port}"], "plain", opts=threads) for e in echoes]
    addrs = [c.exposed_map[f"127.0.0.1:{e.port}"] for c, e in zip(clients, echoes)]
    for a in addrs:
        verified_echo(a, 6)
    os.kill(srv.pid, signal.SIGTERM)
    assert srv.wait_exit(timeout=15) == 0, srv.describe()
    assert srv.stderr_matching(r"draining .*clients=4"), srv.describe()
