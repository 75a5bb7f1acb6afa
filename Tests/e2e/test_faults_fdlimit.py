"""Fault injection: a visitor flood on one service cannot take the descriptors that the
client's other services and its control channel need (issue 13).

The client runs under `prlimit --nofile=512:512` (a hard limit it cannot raise) and
exposes two TCP services. A thousand visitors held open on the first would each cost
the client a local connection (and, without multiplexing, a data channel). The default
visitor limit of each service derives from the free descriptors, so the flood meets
that limit: the second service keeps serving checked echoes, the control channel
stays up, and once the flood ends the descriptors come back within 2 s."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tunnel_support import assert_echoed, fd_count, local_of, poll, settle_fd_count

FLOOD = 1000
RECOVERY = 2.0


def open_flood(addr: tuple[str, int], n: int, within: float) -> list[socket.socket]:
    """n visitor connections, each having sent a few bytes, opened within `within` s;
    those the tunnel refuses at its limit are reset, some before connect() returns."""
    deadline = time.monotonic() + within
    socks = []
    try:
        for i in range(n):
            assert time.monotonic() < deadline, f"only {i} flood connections within {within}s"
            try:
                s = socket.create_connection(addr, timeout=5)
            except ConnectionResetError:
                continue
            socks.append(s)
            try:
                s.sendall(b"flood %d\n" % i)
            except OSError:
                pass
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


@pytest.mark.parametrize("mux", ["1", "0"])
def test_flood_on_one_service_leaves_the_other_its_descriptors(kit, mux):
    server = kit.start_server()
    flooded, other = kit.echo(), kit.echo()
    client = kit.spawn(
        ["client", f"127.0.0.1:{server.server_addr[1]}", "-R", f"0:{local_of(flooded)}", "-R", f"0:{local_of(other)}",
         "--token-file", kit.token_file, "--mux", mux],
        prefix=["prlimit", "--nofile=512:512", "--"])
    exposed = client.exposed(2)
    flooded_addr, other_addr = exposed[local_of(flooded)], exposed[local_of(other)]
    assert_echoed(flooded_addr, [os.urandom(64 * 1024) for _ in range(2)], timeout=15)
    assert_echoed(other_addr, [os.urandom(64 * 1024) for _ in range(2)], timeout=15)
    baseline = settle_fd_count(client.pid)

    flood = open_flood(flooded_addr, FLOOD, within=30)
    try:
        client.wait_stderr(r"^warning visitors refused: service at its limit .*service=", timeout=10)
        assert_echoed(other_addr, [os.urandom(256 * 1024) for _ in range(4)], timeout=15)
        assert fd_count(client.pid) < 512
    finally:
        for s in flood:
            s.close()
    ended = time.monotonic()

    poll(lambda: fd_count(client.pid) <= baseline + 4, RECOVERY + 1, "the client's descriptors back near the baseline",
         step=0.05)
    took = time.monotonic() - ended
    assert took < RECOVERY, f"descriptors recovered {took:.1f}s after the flood"
    assert_echoed(flooded_addr, [os.urandom(64 * 1024) for _ in range(2)], timeout=RECOVERY + 3)
    assert_echoed(other_addr, [os.urandom(64 * 1024) for _ in range(2)], timeout=5)
    assert client.running()
    assert client.count_stderr(r"control channel lost|reconnecting|too many open files|EMFILE") == 0, client.describe(60)
    assert server.count_stderr(r"client disconnected") == 0, server.describe(60)
