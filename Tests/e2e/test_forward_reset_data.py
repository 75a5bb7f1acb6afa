"""A reset must not overtake the bytes its sender wrote just before it (`culvert forward tcp`).

When a peer writes and then aborts (close with SO_LINGER {1, 0}), its last bytes and
the RST often reach culvert's socket together, and epoll reports readable and error at
once.  Linux still hands those bytes to recv() before it reports ECONNRESET, and a
direct connection would deliver them: the relay must pass them on first and then reset
the other side (which still sees a reset, after the bytes).  The relay does not wait
for a slow reader before the reset (what the other end's socket cannot take at once is
dropped, as the aborting peer's own unsent bytes are), so every reader here keeps reading.

The race is timing dependent, so each case runs a bounded number of rounds and counts
the rounds that lost bytes.
"""

from __future__ import annotations

import hashlib
import queue
import random
import select
import socket
import struct
import threading
import time

import pytest

from conftest import TcpServer, connect

COPIERS = [
    pytest.param([], id="splice"),
    pytest.param(["--no-splice"], id="buffered"),
]

#: Bytes written right before the reset: more than one relay buffer, well under what
#: a loopback receive queue holds.
SIZE = 100_000
ROUNDS = 40
#: Bound on the rounds of one case, however many of ROUNDS are done by then.
CASE_SECONDS = 20.0
PAYLOAD = random.Random(7).randbytes(SIZE)


def abort(sock: socket.socket) -> None:
    """Closes with a reset (RST) instead of a FIN: unsent bytes are dropped by our kernel."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_until_end(sock: socket.socket, first: threading.Event | None = None) -> tuple[bytes, str]:
    """Everything `sock` receives and how the stream ended: 'eof' or 'reset'."""
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(got), "reset"
        if not chunk:
            return bytes(got), "eof"
        got += chunk
        if first is not None:
            first.set()


class Received:
    """What one stream delivered, compared with PAYLOAD."""

    def __init__(self, data: bytes, ending: str):
        self.count = len(data)
        self.intact = hashlib.sha256(data).digest() == hashlib.sha256(PAYLOAD).digest()
        self.ending = ending

    def __repr__(self) -> str:
        return f"{self.count}/{SIZE} bytes ({'intact' if self.intact else 'NOT intact'}), {self.ending}"


class RecordingTarget(TcpServer):
    """Reads each connection to its end; the first byte tells the client the relay is up."""

    def __init__(self):
        super().__init__()
        self.first = queue.Queue()
        self.results = queue.Queue()

    def handle(self, conn: socket.socket) -> None:
        first = threading.Event()
        self.first.put(first)
        data, ending = read_until_end(conn, first)
        conn.close()
        # The client's marker byte opens the stream; the payload follows it.
        self.results.put(Received(data[1:], ending))


class AbortingTarget(TcpServer):
    """Waits for the client's marker byte (so the relay is running), then sends PAYLOAD and
    resets at once, reading whatever the client uploads meanwhile so the relay keeps
    writing toward it."""

    def handle(self, conn: socket.socket) -> None:
        assert conn.recv(1) == b"m"
        conn.setblocking(False)
        sent = 0
        while sent < SIZE:
            readable, writable, _ = select.select([conn], [conn], [], 10)
            if readable:
                conn.recv(65536)
            if writable:
                sent += conn.send(PAYLOAD[sent:])
        abort(conn)


def run_rounds(one_round) -> list:
    """Outcomes of up to ROUNDS rounds within CASE_SECONDS."""
    outcomes = []
    deadline = time.monotonic() + CASE_SECONDS
    while len(outcomes) < ROUNDS and time.monotonic() < deadline:
        outcomes.append(one_round())
    return outcomes


def check(outcomes: list, c, reader_sees_reset: bool = True) -> None:
    lost = [o for o in outcomes if not o.intact]
    assert not lost, f"{len(lost)} of {len(outcomes)} rounds lost bytes sent before the reset: {lost[:5]}"
    if reader_sees_reset:
        assert all(o.ending == "reset" for o in outcomes), f"the reset must still be passed on: {outcomes}"
    c.wait_stderr(r"connection closed .*reason=reset", timeout=5, count=len(outcomes))
    assert c.running()


@pytest.mark.parametrize("copier", COPIERS)
def test_bytes_a_client_sent_before_its_reset_reach_the_target(start_culvert, servers, copier):
    target = servers(RecordingTarget())
    c = start_culvert("127.0.0.1:0", target.address, opts=copier)

    def one_round() -> Received:
        s = connect(c.addr)
        s.sendall(b"m")
        assert target.first.get(timeout=10).wait(10), "the marker byte never reached the target"
        s.sendall(PAYLOAD)
        abort(s)
        return target.results.get(timeout=10)

    outcomes = run_rounds(one_round)
    assert len(outcomes) >= 5
    check(outcomes, c)


def client_round(address, uploading: bool) -> Received:
    s = connect(address)
    s.sendall(b"m")
    stop = threading.Event()

    def upload() -> None:
        # Keeps the relay's client-to-target direction busy when the target resets, so
        # writing toward the reset target may be what fails first. Paced, so that the
        # client goes on reading: bytes its socket cannot take when the reset comes are
        # dropped, since the relay passes them on without waiting.
        chunk = b"u" * 16384
        try:
            while not stop.is_set():
                s.send(chunk)
                time.sleep(0.0005)
        except OSError:
            pass

    uploader = threading.Thread(target=upload, daemon=True)
    if uploading:
        uploader.start()
    try:
        data, ending = read_until_end(s)
    finally:
        stop.set()
        if uploading:
            uploader.join(timeout=10)
        s.close()
    return Received(data, ending)


@pytest.mark.parametrize("uploading", [False, True], ids=["quiet", "uploading"])
@pytest.mark.parametrize("copier", COPIERS)
def test_bytes_a_target_sent_before_its_reset_reach_the_client(start_culvert, servers, copier, uploading):
    target = servers(AbortingTarget())
    c = start_culvert("127.0.0.1:0", target.address, opts=copier)
    outcomes = run_rounds(lambda: client_round(c.addr, uploading))
    assert len(outcomes) >= 5
    # Linux reports a reset to one call only: when the client's own send takes it, its
    # next recv says EOF, so only the log tells the reset apart there.
    check(outcomes, c, reader_sees_reset=not uploading)
