"""Fault: an authenticated client floods the control channel with pings and never reads
the pongs. The server's send queue for that channel is capped: it drops the client with
one line naming the cause, its memory stays flat, and other clients are not affected."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading
import time

from conftest import MiB
from tunnel_support import (
    CHALLENGE,
    CLIENT_AUTH,
    PROTOCOL_VERSION,
    WELCOME,
    echo_many,
    frame,
    hello,
    poll,
    read_frame,
    rss_bytes,
)

PING = 0x30


def _hmac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def auth_key(token: str) -> bytes:
    """K = HKDF-SHA256(token, info = "culvert/1 auth"), empty salt, 32 bytes (PROTOCOL.md)."""
    prk = _hmac(bytes(32), token.encode())
    return _hmac(prk, b"culvert/1 auth", b"\x01")


def authenticate(sock: socket.socket, token: str) -> None:
    """The control handshake of a real client, by hand: check the server's proof, send
    ours, and ask for no data channels (pool 0, no multiplexing)."""
    deadline = time.monotonic() + 10
    client_nonce = os.urandom(32)
    sock.sendall(hello(client_nonce))
    f = read_frame(sock, deadline)
    assert f is not None and f[0] == CHALLENGE, f"expected a challenge, got {f!r}"
    version, server_nonce, server_proof = f[1][:2], f[1][2:34], f[1][34:66]
    assert version == struct.pack(">H", PROTOCOL_VERSION)
    key = auth_key(token)
    assert server_proof == _hmac(key, b"culvert/1 server", version, client_nonce, server_nonce), \
        "the server's proof does not match the token"
    proof = _hmac(key, b"culvert/1 client", version, client_nonce, server_nonce)
    sock.sendall(frame(CLIENT_AUTH, proof + struct.pack(">HIB", 0, 5000, 0)))
    f = read_frame(sock, deadline)
    assert f is not None and f[0] == WELCOME, f"expected welcome, got {f!r}"


def flood_pings(sock: socket.socket, seconds: float) -> tuple[int, bool]:
    """Sends pings for `seconds` without reading; (pings sent, whether the server cut
    the connection before the time was up)."""
    batch = b"".join(frame(PING, struct.pack(">Q", i)) for i in range(1000))
    sent = 0
    # A timed-out sendall may have sent part of a frame: the flood ends there.
    sock.settimeout(seconds)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sock.sendall(batch)
        except socket.timeout:
            break
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            return sent, True
        sent += 1000
    return sent, False


def test_ping_flood_without_reading_is_dropped_and_memory_stays_flat(kit):
    echo = kit.echo()
    srv = kit.start_server("plain")
    cli = kit.start_client(srv.server_addr, [f"0:127.0.0.1:{echo.port}"], "plain")
    service = cli.exposed_map[f"127.0.0.1:{echo.port}"]
    assert echo_many(service, [b"warm up"], timeout=10) == {0: (7, hashlib.sha256(b"warm up").hexdigest())}
    baseline = rss_bytes(srv.pid)

    # The real client's service is used all through the flood, every byte checked.
    stop = threading.Event()
    failures: list[str] = []
    rounds = [0]

    def visitor():
        payloads = [os.urandom(256 * 1024) for _ in range(4)]
        want = {i: (len(p), hashlib.sha256(p).hexdigest()) for i, p in enumerate(payloads)}
        while not stop.is_set():
            try:
                got = echo_many(service, payloads, timeout=15)
            except AssertionError as e:
                failures.append(str(e))
                return
            if got != want:
                failures.append(f"round {rounds[0]}: echo differs: {got} != {want}")
                return
            rounds[0] += 1

    t = threading.Thread(target=visitor, daemon=True)
    t.start()
    poll(lambda: rounds[0] >= 1 or failures, timeout=15, what="a first visitor round")

    flooder = socket.socket()
    # A tiny receive window: the pongs pile up on the server, not in our kernel.
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flooder.connect(srv.server_addr)
    peer_port = flooder.getsockname()[1]
    peak = [baseline]
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_bytes(srv.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        authenticate(flooder, kit.token)
        sampler.start()
        rounds_before = rounds[0]
        t0 = time.monotonic()
        sent, cut = flood_pings(flooder, seconds=6)
        took = time.monotonic() - t0
    finally:
        flooder.close()
        sampling.set()
    if sampler.is_alive():
        sampler.join(timeout=2)
    lines = srv.wait_stderr(
        rf"client disconnected peer=127\.0\.0\.1:{peer_port} reason=\"peer is not reading: \d+ bytes queued, "
        rf"over the send queue cap of \d+\"", timeout=5)
    assert cut, f"the server kept a client that never read ({sent} pings in {took:.1f}s)"
    assert took < 5, f"the server took {took:.1f}s to drop the client ({sent} pings)"
    grown = peak[0] - baseline
    assert grown < 8 * MiB, f"server RSS grew by {grown / MiB:.1f} MiB during the flood ({sent} pings)"
    assert len(lines) == 1
    assert srv.count_stderr(rf"peer=127\.0\.0\.1:{peer_port}\b") == 2, \
        "expected only the connect and the disconnect line for the flooder"

    # The real client kept working through the flood and still does.
    stop.set()
    t.join(timeout=30)
    assert not t.is_alive(), "the visitor thread did not finish"
    assert not failures, failures
    assert rounds[0] > rounds_before, "no visitor round finished after the flood began"
    assert cli.running()
    data = os.urandom(1 * MiB)
    assert echo_many(service, [data], timeout=15) == {0: (len(data), hashlib.sha256(data).hexdigest())}
