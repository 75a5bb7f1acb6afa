"""End-to-end tests for multiplexed data channels (`culvert client --mux N`): TCP
visitors as streams on a few carrier connections (docs/PROTOCOL.md, "Multiplexed
data channels")."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import time

import pytest

from conftest import (
    MiB,
    RespondAfterEofServer,
    SlowServer,
    connect_expect_closed,
    echo_once,
    expect_closed,
    recv_all,
    round_trip,
)
from tunnel_support import (
    local_of,
    FloodServer,
    StallServer,
    StuckUpload,
    connections_to,
    echo_many,
    free_port,
    half_close_exchange,
    open_visitors,
    poll,
    rss_bytes,
    wait_stalled,
)

# the transports: plain TCP and TLS with the token as pre-shared key
TRANSPORTS = ["plain", "tls-psk"]


@pytest.fixture(params=TRANSPORTS)
def mode(request):
    return request.param


def tunnel_connections(srv, expected: int, timeout: float = 5.0) -> int:
    """Waits until the client ends of connections to the server's tunnel port number
    `expected`, and checks they stay there for a few samples."""
    port = srv.server_addr[1]
    poll(lambda: len(connections_to(port)) == expected, timeout,
         f"{expected} tunnel connection(s) (now {len(connections_to(port))})")
    samples = []
    for _ in range(5):
        samples.append(len(connections_to(port)))
        time.sleep(0.05)
    assert samples == [expected] * 5, f"tunnel connections {samples}, expected {expected}"
    return expected


# one random block; each visitor sends its own slice of it
_BLOCK = os.urandom(6 * MiB)


def payload(i: int) -> bytes:
    off = (i * 131_071) % (3 * MiB)
    return _BLOCK[off:off + 2 * MiB + i * 40_009]


# --------------------------------------------------------------------------
# (a) integrity: dedicated channels and one or more carriers


@pytest.mark.parametrize("mux", [0, 1, 3])
def test_concurrent_bulk_echo_verified(kit, mode, mux):
    echo = kit.echo()
    srv = kit.start_server(mode)
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], mode, opts=["--mux", str(mux)])
    addr = cli.exposed_map[local_of(echo)]
    if mux:
        # The carriers open after the ready line: on a loaded machine visitors that come
        # first all ride the one carrier up so far, which is right but not what is checked.
        tunnel_connections(srv, 1 + mux)

    n = 20
    results = echo_many(addr, [payload(i) for i in range(n)], timeout=30)
    bad = [i for i in range(n) if results.get(i) != (len(payload(i)), hashlib.sha256(payload(i)).hexdigest())]
    assert not bad, f"{len(bad)} visitor(s) got a wrong echo, e.g. {bad[:5]}: {[results.get(i) for i in bad[:3]]}"
    assert echo.accepted == n
    # every visitor ended cleanly, with its byte count in the server's close line
    srv.wait_stderr(r"connection closed .*reason=eof", count=n, timeout=10)
    ups = {int(m) for line in srv.stderr_matching(r"connection closed") for m in re.findall(r" up=(\d+)", line)}
    missing = [i for i in range(n) if len(payload(i)) not in ups]
    assert not missing, f"no server close line with up=<size> for visitors {missing[:5]}"
    if mux:
        # the visitors rode on the carriers: still just control + carriers, and each
        # carrier took its share of them (the visitors' ~48 MB went both ways on each)
        tunnel_connections(srv, 1 + mux)
        busy = [c for c in connections_to(srv.server_addr[1]) if min(c) > 4 * MiB]
        assert len(busy) == mux, f"(sent, received) per tunnel connection: {connections_to(srv.server_addr[1])}"
    assert not srv.stderr_matching(r"multiplexed data channel lost"), srv.describe()


# --------------------------------------------------------------------------
# (b) visitors cost no tunnel connections


def test_idle_visitors_add_no_tunnel_connections(kit, mode):
    echo = kit.echo()
    srv = kit.start_server(mode)
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], mode, opts=["--mux", "2"])
    addr = cli.exposed_map[local_of(echo)]
    tunnel_connections(srv, 3)  # control + 2 carriers, nothing pooled

    with open_visitors(addr, 30, b"visitor %d is here") as visitors:
        assert echo.accepted == 30
        # 30 open, idle visitors later: still exactly control + 2 carriers
        tunnel_connections(srv, 3, timeout=1)
        # and every one of them still answers
        for i, s in enumerate(visitors):
            round_trip(s, b"still %d" % i)
    srv.wait_stderr(r"connection closed", count=30, timeout=10)
    tunnel_connections(srv, 3, timeout=1)


def test_without_mux_each_visitor_has_its_own_channel(kit):
    """The counterpart of the test above, which also shows the count measures visitors."""
    echo = kit.echo()
    srv = kit.start_server("plain")
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], "plain", opts=["--mux", "0", "--pool", "0"])
    addr = cli.exposed_map[local_of(echo)]
    tunnel_connections(srv, 1)
    with open_visitors(addr, 10, b"dedicated %d"):
        tunnel_connections(srv, 1 + 10)


# --------------------------------------------------------------------------
# (c) a stream whose reader stops does not stall the carrier


@pytest.mark.parametrize("stalled", ["upload", "download"])
def test_slow_reader_does_not_stall_other_streams(kit, mode, stalled):
    """Visitor A's stream fills up: its local service stops reading A's upload, or A
    stops reading the local service's download. Visitor B, on the same carrier, must not
    notice, and neither end may buffer A's bytes beyond the stream's window."""
    # More than every buffer on the way could hold: loopback sockets autotune their
    # receive buffers up to net.ipv4.tcp_rmem's maximum (32 MiB here), so "pushed back"
    # means "stopped before all of it went", and culvert's own share is the RSS check.
    size = 64 * MiB
    local = kit.local(StallServer() if stalled == "upload" else FloodServer(limit=size))
    echo = kit.echo()
    srv = kit.start_server(mode)
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(local)}", f"0:{local_of(echo)}"], mode,
                           opts=["--mux", "1"])
    a_addr = cli.exposed_map[local_of(local)]
    b_addr = cli.exposed_map[local_of(echo)]
    tunnel_connections(srv, 2)  # both services' visitors share the one carrier
    echo_once(b_addr, b"warm up")
    rss0 = {"server": rss_bytes(srv.pid), "client": rss_bytes(cli.pid)}

    if stalled == "upload":
        a = StuckUpload(a_addr, size)
        progress = lambda: a.sent  # noqa: E731
    else:
        a = socket.create_connection(a_addr, timeout=10)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        progress = lambda: local.sent  # noqa: E731
    try:
        stuck_at = wait_stalled(progress, f"A's {stalled} to back up")
        assert 0 < stuck_at < size, f"{stuck_at} bytes of A's {stalled} went into buffers: nothing pushed back"

        # visitor B on the same carrier is not held up by A's full stream
        with socket.create_connection(b_addr, timeout=5) as b:
            t0 = time.monotonic()
            for i in range(50):
                round_trip(b, b"round trip %02d " % i * 40)
            elapsed = time.monotonic() - t0
        assert elapsed < 3, f"50 round trips took {elapsed:.2f}s while another stream was stalled"

        # neither end buffered A's bytes: per-stream windows bound what is in flight
        rss1 = {"server": rss_bytes(srv.pid), "client": rss_bytes(cli.pid)}
        grown = {k: rss1[k] - rss0[k] for k in rss0}
        assert grown["server"] < 16 * MiB, f"server RSS grew by {grown['server'] / MiB:.1f} MiB ({stuck_at} bytes in)"
        assert grown["client"] < 16 * MiB, f"client RSS grew by {grown['client'] / MiB:.1f} MiB ({stuck_at} bytes in)"
        assert progress() == stuck_at, "A moved while B ran"
    finally:
        a.close()
    # the carrier keeps serving new visitors
    echo_once(b_addr, b"after the stall")
    assert not srv.stderr_matching(r"multiplexed data channel lost"), srv.describe()


def test_visitor_abort_ends_its_stalled_stream(kit):
    stall = kit.local(StallServer())
    srv = kit.start_server("plain")
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(stall)}"], "plain", opts=["--mux", "1"])
    addr = cli.exposed_map[local_of(stall)]
    a = StuckUpload(addr, 20 * MiB)
    try:
        a.wait_stuck()
    finally:
        a.close(reset=True)
    # the visitor is gone: its relay, stream and local connection must go too
    # (the relay learns of the reset from EPOLLERR: its direction from the visitor is
    # held back by backpressure, so it would not read the socket by itself)
    srv.wait_stderr(r"connection closed .*listen=127\.0\.0\.1:%d .*reason=reset" % addr[1], timeout=5)
    cli.wait_stderr(r"connection closed .*target=%s .*reason=reset" % re.escape(local_of(stall)), timeout=5)


# --------------------------------------------------------------------------
# (d) half-close


def test_half_close_through_mux_stream(kit, mode):
    response = os.urandom(3 * MiB)
    rae = kit.local(RespondAfterEofServer(response))
    srv = kit.start_server(mode)
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(rae)}"], mode, opts=["--mux", "1"])
    addr = cli.exposed_map[local_of(rae)]

    request = os.urandom(2 * MiB)
    half_close_exchange(addr, request, response, timeout=15)
    poll(lambda: rae.received == [len(request)], 5, "the local service to record the request")
    line = srv.wait_stderr(r"connection closed", timeout=5)[0]
    assert "reason=eof" in line and f" up={len(request)}" in line and f" down={32 + len(response)}" in line, line


# --------------------------------------------------------------------------
# (e) a local service that is down


def test_local_service_down_closes_visitor_and_carrier_survives(kit, mode):
    dead = f"127.0.0.1:{free_port()}"
    echo = kit.echo()
    srv = kit.start_server(mode)
    cli = kit.start_client(srv.server_addr, [f"0:{dead}", f"0:{local_of(echo)}"], mode, opts=["--mux", "1"])
    dead_addr = cli.exposed_map[dead]
    echo_addr = cli.exposed_map[local_of(echo)]
    tunnel_connections(srv, 2)

    with socket.create_connection(echo_addr, timeout=5) as live:
        round_trip(live, b"before")
        for i in range(3):
            t0 = time.monotonic()
            how = connect_expect_closed(dead_addr, 5)
            assert how in ("eof", "reset")
            assert time.monotonic() - t0 < 5
        cli.wait_stderr(r"local service unreachable", count=3, timeout=5)
        # a stream opened before the failures, on the same carrier, goes on
        round_trip(live, b"after")
    echo_once(echo_addr, b"new visitor after the failures")
    assert not srv.stderr_matching(r"multiplexed data channel lost"), srv.describe()
    assert not cli.stderr_matching(r"multiplexed data channel lost"), cli.describe()
    tunnel_connections(srv, 2)


# --------------------------------------------------------------------------
# (f) the client dies under open streams


def test_client_kill9_closes_visitors_and_restarted_client_serves(kit, mode):
    echo = kit.echo()
    rport = free_port()
    srv = kit.start_server(mode)
    cli = kit.start_client(srv.server_addr, [f"{rport}:{local_of(echo)}"], mode, opts=["--mux", "2"])
    addr = cli.exposed_map[local_of(echo)]
    visitors = []
    try:
        for i in range(6):
            s = socket.create_connection(addr, timeout=5)
            visitors.append(s)
            round_trip(s, b"open stream %d" % i)
        cli.send_signal(signal.SIGKILL)
        cli.wait_exit(5)
        t0 = time.monotonic()
        ends = [expect_closed(s, 5) for s in visitors]
        assert time.monotonic() - t0 < 5
        # the streams died with their carrier: an abort, not a clean end
        assert ends == ["reset"] * len(visitors), ends
    finally:
        for s in visitors:
            s.close()
    srv.wait_stderr(r"client disconnected", timeout=5)

    cli2 = kit.start_client(srv.server_addr, [f"{rport}:{local_of(echo)}"], mode, opts=["--mux", "2"])
    assert cli2.exposed_map[local_of(echo)] == addr

    def works():
        echo_once(addr, b"served by the new client", timeout=3)
        return True

    poll(works, 10, "the restarted client to serve visitors", step=0.2)
    tunnel_connections(srv, 3)


# --------------------------------------------------------------------------
# (g) graceful shutdown: visitors already relayed finish


@pytest.mark.parametrize("who", ["client", "server"])
def test_sigterm_lets_running_mux_streams_finish(kit, who):
    # A download that takes ~1.5 s is in flight on the carrier when one end gets
    # SIGTERM: it must arrive whole (drain), and the end must then exit 0.
    body = os.urandom(3 * MiB)
    slow = kit.local(SlowServer(body, chunk=64 * 1024, delay=0.03))
    srv = kit.start_server("tls-psk", opts=["--drain-timeout", "20s"])
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(slow)}"], "tls-psk",
                           opts=["--mux", "1", "--drain-timeout", "20s"])
    addr = cli.exposed_map[local_of(slow)]
    got = {}

    def download():
        with socket.create_connection(addr, timeout=20) as s:
            got["data"] = recv_all(s, limit=8 * MiB)

    t = threading.Thread(target=download, daemon=True)
    t.start()
    # the local service has the download's connection: the stream is relayed end to end
    poll(lambda: slow.accepted == 1 and slow.finished == 0 and len(connections_to(srv.server_addr[1])) == 2, 5,
         "the download to start")
    time.sleep(0.3)
    end = cli if who == "client" else srv
    end.send_signal(signal.SIGTERM)
    t.join(timeout=20)
    assert not t.is_alive(), "the download did not end"
    data = got.get("data", b"")
    assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest(), \
        f"{len(data)} of {len(body)} bytes arrived after SIGTERM to the {who}"
    assert end.wait_exit(10) == 0, end.describe()
