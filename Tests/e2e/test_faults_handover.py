"""Fault injection: a hung client's ports go to its replacement (issue 13).

A client that is stopped (SIGSTOP) or cut off keeps its session until the heartbeat
gives up on it (about 15 s). A replacement client asking for the same port must not be
refused all that time: the server pings the holder with a short deadline (2 s) and, if
it stays silent, ends its session and gives the port to the newcomer. A holder that
answers keeps its port, and the newcomer is refused at once, as before."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from conftest import EchoServer, free_port
from tunnel_support import assert_echoed, local_of, poll

PROBE = 2.0  # the server's ping deadline for a holder of a wanted port
HANDOVER_BOUND = PROBE + 1.5  # replacement started -> its port ready
EXPOSED_SECRET_RE = re.compile(r"^exposed secret (\S+) -> (\S+)$")


@pytest.fixture
def stopped():
    """Processes stopped by the test; resumed on every exit path so teardown can end them."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def payloads(n: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def test_stopped_client_hands_its_port_to_a_replacement(kit, stopped):
    server = kit.start_server()
    port = free_port()
    echo_a, echo_b = kit.local(EchoServer()), kit.local(EchoServer())
    a = kit.start_client(server.server_addr, [f"{port}:{local_of(echo_a)}"])
    public = ("127.0.0.1", port)
    assert_echoed(public, payloads(2, 64 * 1024), timeout=15)
    assert echo_a.accepted == 2

    os.kill(a.pid, signal.SIGSTOP)
    stopped.append(a.pid)
    started = time.monotonic()
    b = kit.start_client(server.server_addr, [f"{port}:{local_of(echo_b)}"], ready=False)
    b.exposed(1, timeout=HANDOVER_BOUND + 5)
    took = time.monotonic() - started
    assert took < HANDOVER_BOUND, f"the replacement got the port after {took:.1f}s"
    server.wait_stderr(r"^warning client did not answer a ping; its services go to a new client .*"
                       rf"wants=\"port {port}\"", timeout=5)
    server.wait_stderr(r"^info client disconnected .*no answer to a ping within 2s", timeout=5)

    assert_echoed(public, payloads(3, 256 * 1024), timeout=15)
    assert echo_b.accepted == 3 and echo_a.accepted == 2

    # Resumed, the old client finds its session gone, reconnects and is refused the
    # port (B answers the server's ping), retrying without taking it back or exiting.
    os.kill(a.pid, signal.SIGCONT)
    stopped.remove(a.pid)
    a.wait_stderr(rf"server refused service {port}:.*port {port} is already in use", timeout=20)
    server.wait_stderr(rf"^warning service refused (?=.*port={port}\b)(?=.*already in use)", timeout=5)
    assert a.running(), a.describe()
    assert b.running(), b.describe()
    assert b.count_stderr(r"control channel lost|reconnecting") == 0, b.describe()
    assert_echoed(public, payloads(3, 64 * 1024), timeout=15)
    assert echo_b.accepted == 6 and echo_a.accepted == 2
    # Only the stopped client was probed out: B, live, was asked and kept its port.
    assert server.count_stderr(r"client did not answer a ping") == 1, server.describe(80)


def test_live_client_keeps_its_port(kit):
    """A holder that answers the ping keeps its port; the newcomer is refused quickly
    (as before the handover existed: this guards that the check refuses)."""
    server = kit.start_server()
    port = free_port()
    echo_a, echo_b = kit.local(EchoServer()), kit.local(EchoServer())
    a = kit.start_client(server.server_addr, [f"{port}:{local_of(echo_a)}"])

    started = time.monotonic()
    b = kit.start_client(server.server_addr, [f"{port}:{local_of(echo_b)}"], ready=False)
    assert b.wait_exit(10) == 1
    took = time.monotonic() - started
    assert took < PROBE, f"refusing took {took:.1f}s: the holder answered at once"
    assert re.search(rf"server refused service {port}:.*port {port} is already in use", b.stderr_text()), b.describe()
    assert server.count_stderr(r"client did not answer a ping") == 0, server.describe(80)
    assert a.running()
    assert_echoed(("127.0.0.1", port), payloads(2, 64 * 1024), timeout=15)
    assert echo_a.accepted == 2 and echo_b.accepted == 0


def test_stopped_client_hands_its_secret_name_to_a_replacement(kit, stopped):
    server = kit.start_server()
    echo = kit.echo()
    a = kit.start_client(server.server_addr, [], opts=["--secret", f"db={local_of(echo)}"], ready=False)
    a.wait_stdout(EXPOSED_SECRET_RE, 1)
    os.kill(a.pid, signal.SIGSTOP)
    stopped.append(a.pid)

    started = time.monotonic()
    b = kit.start_client(server.server_addr, [], opts=["--secret", f"db={local_of(echo)}"], ready=False)
    b.wait_stdout(EXPOSED_SECRET_RE, 1, timeout=HANDOVER_BOUND + 5)
    took = time.monotonic() - started
    assert took < HANDOVER_BOUND, f"the replacement got the name after {took:.1f}s"
    server.wait_stderr(r"^warning client did not answer a ping; its services go to a new client .*"
                       r"wants=\"secret service 'db'\"", timeout=5)
    poll(lambda: server.count_stderr(r"^info secret service registered .*service=db\b") == 2, 5,
         "the name registered by the replacement")
