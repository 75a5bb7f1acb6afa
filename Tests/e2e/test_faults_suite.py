"""Fault injection (issue 13): crashes, restarts and floods around a working tunnel.

Each scenario checks SHA-256-verified transfers before and after the fault, that the
service serves a new visitor within 2 s of the fault ending (plus the documented
reconnect backoff where a client has to reconnect: clients run with
--reconnect-max 1s), and that descriptors and CLOSE_WAIT sockets of culvert's processes
come back to their baseline within a small bound."""

from __future__ import annotations

import errno
import hashlib
import os
import selectors
import signal
import socket
import threading
import time

from tunnel_support import (Transfer, assert_echoed, assert_settled, connect_refused, free_port, local_of, poll,
                            served_within, settle_fd_count)

HEARTBEAT = ["--heartbeat-interval", "500ms", "--heartbeat-misses", "2"]
HEARTBEAT_TIMEOUT = 1.0  # 500 ms x 2 misses
BACKOFF = 1.0  # --reconnect-max
RECONNECT = ["--reconnect-max", f"{BACKOFF:g}s"]
SERVED_AFTER_FAULT = 2.0


# --------------------------------------------------------------------------
# kill -9 of the client during 50 concurrent transfers


def test_client_kill9_during_50_transfers(kit):
    echo = kit.echo()
    rport = free_port()
    srv = kit.start_server("tls-psk", opts=HEARTBEAT)
    spec = [f"{rport}:{local_of(echo)}"]
    cli = kit.start_client(srv.server_addr, spec, "tls-psk", opts=[*HEARTBEAT, *RECONNECT])
    addr = cli.exposed_map[local_of(echo)]
    assert_echoed(addr, [os.urandom(64 * 1024) for _ in range(5)], timeout=10)
    baseline = settle_fd_count(srv.pid)

    accepted_before = echo.accepted
    transfers = [Transfer(addr, 2 << 20) for _ in range(50)]
    poll(lambda: echo.accepted - accepted_before >= 25, 10, "transfers to be under way", step=0.01)
    cli.send_signal(signal.SIGKILL)
    cli.wait_exit(5)
    killed = time.monotonic()

    srv.wait_stderr(r"client disconnected", timeout=HEARTBEAT_TIMEOUT + 1)
    poll(lambda: connect_refused(addr), HEARTBEAT_TIMEOUT + 1, "the server to free the exposed port")
    assert time.monotonic() - killed <= HEARTBEAT_TIMEOUT + 1
    # the transfers were cut (that is the fault), but none may hang or deliver wrong bytes
    for t in transfers:
        t.join(deadline=killed + 10)
    corrupt = [t.corrupt for t in transfers if t.corrupt]
    assert not corrupt, corrupt[:5]
    assert any(t.got < len(t.payload) for t in transfers), "the kill came after every transfer had finished"

    restarted = time.monotonic()
    cli2 = kit.start_client(srv.server_addr, spec, "tls-psk", opts=[*HEARTBEAT, *RECONNECT])
    assert cli2.exposed_map[local_of(echo)] == addr
    served_within(addr, SERVED_AFTER_FAULT, restarted, "a visitor after the client restart")
    assert_echoed(addr, [os.urandom(256 * 1024) for _ in range(5)], timeout=10)
    assert_settled(srv, baseline, "the server")


# --------------------------------------------------------------------------
# the server killed and restarted three times during load


class EchoLoop:
    """Short verified echoes against `addr`, back to back, from a thread. Failures are
    expected while the server is down; a completed echo with wrong bytes never is."""

    def __init__(self, addr: tuple[str, int]):
        self.addr = addr
        self.ok = 0
        self.failed = 0
        self.corrupt: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            payload = os.urandom(16 * 1024)
            got = bytearray()
            try:
                with socket.create_connection(self.addr, timeout=2) as s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    while chunk := s.recv(65536):
                        got += chunk
            except OSError:
                self.failed += 1
                time.sleep(0.02)
                continue
            if bytes(got) == payload:
                self.ok += 1
            elif payload.startswith(bytes(got)):
                self.failed += 1  # cut short by the crash
            else:
                self.corrupt.append(f"{len(got)} bytes, sha256 {hashlib.sha256(got).hexdigest()[:16]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "the echo loop hung"


def test_server_restarted_three_times_during_load(kit):
    echo = kit.echo()
    sport, rport = free_port(), free_port()
    srv = kit.start_server("plain", port=sport, opts=HEARTBEAT)
    cli = kit.start_client(srv.server_addr, [f"{rport}:{local_of(echo)}"], "plain",
                           opts=[*HEARTBEAT, *RECONNECT])
    addr = cli.exposed_map[local_of(echo)]
    assert_echoed(addr, [os.urandom(256 * 1024) for _ in range(5)], timeout=10)
    baseline = settle_fd_count(cli.pid)

    loop = EchoLoop(addr)
    try:
        for round_ in range(1, 4):
            poll(lambda: loop.ok >= 3, 5, f"echoes to flow before crash {round_}", step=0.02)
            srv.send_signal(signal.SIGKILL)
            srv.wait_exit(5)
            cli.wait_stderr(r"control channel lost|server stopped answering", count=round_, timeout=5)
            srv = kit.start_server("plain", port=sport, opts=HEARTBEAT)
            restarted = time.monotonic()
            served_within(addr, BACKOFF + SERVED_AFTER_FAULT, restarted, f"a visitor after restart {round_}")
            loop.ok = 0
    finally:
        loop.stop()
    assert not loop.corrupt, f"echoes with wrong bytes during the restarts: {loop.corrupt[:5]}"
    assert loop.failed > 0, "no echo met an outage: the load did not run across the restarts"
    assert cli.running(), cli.describe()
    assert_echoed(addr, [os.urandom(256 * 1024) for _ in range(5)], timeout=10)
    assert_settled(cli, baseline, "the client")


# --------------------------------------------------------------------------
# a burst of 1,000 visitors


def visitor_burst(addr: tuple[str, int], count: int, size: int, deadline: float) -> tuple[int, int, list[str]]:
    """Opens `count` visitors as fast as the kernel takes them, each sending `size`
    random bytes and reading them back, all from one selector. (served, refused, hung):
    refused are those reset, refused or closed before their echo; hung those still open
    at the deadline; a visitor that gets wrong bytes fails the test."""
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, dict] = {}
    served = refused = 0
    corrupt: list[str] = []

    def finish(s: socket.socket, ok: bool | None) -> None:
        nonlocal served, refused
        sel.unregister(s)
        st = state.pop(s)
        s.close()
        if ok:
            served += 1
        elif ok is None:
            corrupt.append(f"visitor {st['i']}: {len(st['got'])} bytes that are not its own")
        else:
            refused += 1

    for i in range(count):
        s = socket.socket()
        s.setblocking(False)
        rc = s.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            refused += 1
            continue
        payload = os.urandom(size)
        state[s] = {"i": i, "payload": payload, "sent": 0, "got": bytearray()}
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)

    while state and time.monotonic() < deadline:
        for key, events in sel.select(timeout=0.1):
            s = key.fileobj
            st = state[s]
            try:
                if events & selectors.EVENT_WRITE and st["sent"] < size:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    st["sent"] += s.send(st["payload"][st["sent"]:])
                    if st["sent"] == size:
                        sel.modify(s, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    chunk = s.recv(65536)
                    if not chunk:
                        finish(s, False)
                        continue
                    st["got"] += chunk
                    if not st["payload"].startswith(bytes(st["got"])):
                        finish(s, None)
                    elif len(st["got"]) == size:
                        finish(s, True)
            except BlockingIOError:
                continue
            except OSError:
                finish(s, False)
    hung = len(state)
    for s in list(state):
        sel.unregister(s)
        s.close()
    sel.close()
    assert not corrupt, corrupt[:5]
    return served, refused, hung


def test_visitor_burst_of_1000(kit):
    echo = kit.echo()
    srv = kit.start_server("tls-psk")
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], "tls-psk")
    addr = cli.exposed_map[local_of(echo)]
    assert_echoed(addr, [os.urandom(256 * 1024) for _ in range(5)], timeout=10)
    srv_base, cli_base = settle_fd_count(srv.pid), settle_fd_count(cli.pid)

    served, refused, hung = visitor_burst(addr, 1000, 1024, deadline=time.monotonic() + 25)
    ended = time.monotonic()
    assert hung == 0, f"{hung} visitors neither served nor refused after 25 s ({served} served, {refused} refused)"
    assert served + refused == 1000
    assert served > 0, f"no visitor of the burst was served ({refused} refused)"

    served_within(addr, SERVED_AFTER_FAULT, ended, "a visitor after the burst")
    assert_echoed(addr, [os.urandom(256 * 1024) for _ in range(5)], timeout=10)
    assert_settled(srv, srv_base, "the server")
    assert_settled(cli, cli_base, "the client")
