"""Fault injection: connections that never authenticate (slowloris) from many source
addresses must not keep real clients or the data channels of running sessions out,
and the server logs such a flood in a bounded number of lines (issue 13, item 4)."""

from __future__ import annotations

import hashlib
import os
import socket
import time

from tunnel_support import Slowloris, echo_many, fd_count, poll, raw_connect, settle_fd_count, wait_closed_no_data

# 39 attacker addresses holding 6 silent connections each: 234 > the default budget of
# 128, and under the default per-address cap of 8, so only the budget's own fairness
# can let a new client in.
ATTACKERS = [f"127.0.0.{i}" for i in range(2, 41)]
PER_ATTACKER = 6
REFUSAL_LINE = r"connection refused|handshake failed|connection dropped|unauthenticated connections refused"


def wait_flooded(srv, flood: Slowloris) -> None:
    """Until the budget is full: the attackers reopened well past it and it refused some."""
    poll(lambda: flood.opened > len(flood.slots) + 20, 15, "the flood to churn")
    srv.wait_stderr(r"too many unauthenticated connections|unauthenticated connections refused .*limit=", timeout=10)


def refusals_logged(srv) -> tuple[int, int]:
    """(refusal lines, refusals those lines account for)."""
    lines = srv.stderr_matching(REFUSAL_LINE)
    counted = 0
    for line in lines:
        if "unauthenticated connections refused" in line:
            counted += sum(int(v) for k, v in (f.split("=", 1) for f in line.split() if "=" in f)
                           if k in ("limit", "per_source", "displaced", "handshake_failed", "timed_out", "auth_failed", "data_rejected"))
        else:
            counted += 1
    return len(lines), counted


def test_new_client_gets_in_during_slowloris(kit):
    echo = kit.echo()
    srv = kit.start_server()
    with Slowloris(srv.server_addr, ATTACKERS, PER_ATTACKER) as flood:
        wait_flooded(srv, flood)
        t0 = time.monotonic()
        cli = kit.start_client(srv.server_addr, [f"0:127.0.0.1:{echo.port}"], ready=False,
                               opts=["--reconnect-max", "1s"])
        addr = list(cli.exposed(1, timeout=10).values())[0]
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0, f"the client got in only after {elapsed:.2f}s"
        payload = os.urandom(512 * 1024)
        got = echo_many(addr, [payload], timeout=10)
        assert got[0] == (len(payload), hashlib.sha256(payload).hexdigest())
        time.sleep(2)  # at least two summary intervals of flood
    lines, refusals = refusals_logged(srv)
    assert refusals >= 200, f"the flood was refused only {refusals} times"
    assert lines <= 30, f"{lines} refusal lines for {refusals} refusals"
    assert srv.stderr_matching(r"unauthenticated connections refused .*interval=1s"), srv.describe()


def test_data_channels_of_running_client_during_slowloris(kit):
    echo = kit.echo()
    srv = kit.start_server()
    # no pool and no multiplexing: every visitor needs a new data channel during the flood
    cli = kit.start_client(srv.server_addr, [f"0:127.0.0.1:{echo.port}"], opts=["--mux", "0", "--pool", "0"])
    addr = list(cli.exposed_map.values())[0]
    with Slowloris(srv.server_addr, ATTACKERS, PER_ATTACKER) as flood:
        wait_flooded(srv, flood)
        for round_ in range(3):
            payloads = [os.urandom(64 * 1024 + 997 * i) for i in range(8)]
            t0 = time.monotonic()
            got = echo_many(addr, payloads, timeout=10)
            for i, p in enumerate(payloads):
                assert got[i] == (len(p), hashlib.sha256(p).hexdigest()), f"round {round_} visitor {i}"
            assert time.monotonic() - t0 < 3.0, f"round {round_} took {time.monotonic() - t0:.2f}s"
    lines, refusals = refusals_logged(srv)
    assert lines <= 30, f"{lines} refusal lines for {refusals} refusals"
    assert cli.running()


def test_one_address_is_capped(kit):
    srv = kit.start_server("plain", opts=["--max-unauthenticated-per-source", "3"])
    before = settle_fd_count(srv.pid)
    held = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.bind(("127.0.0.7", 0))
            s.connect(srv.server_addr)
            held.append(s)
        # the loops accept in parallel: wait until all three are in, so the fourth is the one over
        poll(lambda: fd_count(srv.pid) >= before + 3, 5, "the three connections accepted")
        # the fourth from the same address is turned away, one from another address is not
        fourth = socket.socket()
        fourth.bind(("127.0.0.7", 0))
        try:
            fourth.connect(srv.server_addr)
            closed, _ = wait_closed_no_data(fourth, 2)
        except ConnectionResetError:
            closed = True
        finally:
            fourth.close()
        assert closed, "a fourth connection from one address was not refused"
        srv.wait_stderr(r"too many unauthenticated connections from this address peer=127\.0\.0\.7:\d+ max=3", timeout=3)
        with raw_connect(srv.server_addr) as other:
            closed, _ = wait_closed_no_data(other, 0.5)
            assert not closed, "a connection from another address was refused"
    finally:
        for s in held:
            s.close()
