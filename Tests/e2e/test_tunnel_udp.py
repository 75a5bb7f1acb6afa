"""End-to-end tests for UDP services through the tunnel (`-R udp:...`)."""

from __future__ import annotations

import hashlib
import os
import random
import selectors
import socket
import struct
import time

import pytest

from conftest import Culvert, wait_stdout_line
from tunnel_support import UdpServer


@pytest.fixture
def udp_tunnel(culvert_path, tmp_path):
    procs: list[Culvert] = []
    servers: list[UdpServer] = []
    token = tmp_path / "token"
    token.write_text("udp-tunnel-test-token-0123456789\n")

    def start(answer, transport="plain", extra=()):
        target = UdpServer(answer)
        servers.append(target)
        server = Culvert(culvert_path, ["server", "--listen", "127.0.0.1:0", "--token-file", str(token),
                                        "--transport", transport, "--bind-addr", "127.0.0.1"])
        procs.append(server)
        port = int(wait_stdout_line(server, r"^listening tunnel 127\.0\.0\.1:(\d+)$").group(1))
        client = Culvert(culvert_path, ["client", f"127.0.0.1:{port}", "--token-file", str(token), "--transport", transport,
                                        *extra, "-R", f"udp:127.0.0.1:0:127.0.0.1:{target.port}"])
        procs.append(client)
        exposed = int(wait_stdout_line(client, r"^exposed udp 127\.0\.0\.1:(\d+) -> ").group(1))
        return target, ("127.0.0.1", exposed), client

    yield start
    for p in procs:
        p.kill()
    for s in servers:
        s.close()


def hash_answer(data: bytes) -> bytes:
    # The first 16 bytes identify the visitor; echo them with the hash of the whole datagram.
    return data[:16] + hashlib.sha256(data).digest()


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_500_visitors_exchange_verified_datagrams_without_cross_talk(udp_tunnel, transport):
    target, addr, _ = udp_tunnel(hash_answer, transport)
    sel = selectors.DefaultSelector()
    visitors = []
    for i in range(500):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        ident = os.urandom(16)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        visitors.append((s, ident))
        sel.register(s, selectors.EVENT_READ, i)
    rng = random.Random(5)
    pending: dict[int, list[bytes]] = {}
    for i, (s, ident) in enumerate(visitors):
        msgs = [ident + rng.randbytes(rng.choice([16, 400, 1400, 9000])) for _ in range(3)]
        pending[i] = msgs
    verified = 0
    deadline = time.monotonic() + 90
    # Bursts are paced in groups of 50 visitors; a lost datagram (loopback UDP may drop
    # under load) is resent a bounded number of times.
    for group_start in range(0, 500, 50):
        group = [i for i in range(group_start, group_start + 50)]
        for attempt in range(5):
            waiting = [i for i in group if i in pending]
            if not waiting or time.monotonic() > deadline:
                break
            for i in waiting:
                s, _ = visitors[i]
                for m in pending[i]:
                    s.sendto(m, addr)
            round_deadline = time.monotonic() + 3
            while any(i in pending for i in group) and time.monotonic() < round_deadline:
                for key, _ in sel.select(timeout=0.2):
                    i = key.data
                    s, ident = visitors[i]
                    while True:
                        try:
                            reply, _src = s.recvfrom(70000)
                        except BlockingIOError:
                            break
                        assert reply[:16] == ident, "a reply reached the wrong visitor"
                        left = pending.get(i)
                        if left is None:
                            continue
                        match = [m for m in left if hashlib.sha256(m).digest() == reply[16:]]
                        if not match:
                            continue  # a second answer to a resent datagram
                        left.remove(match[0])
                        verified += 1
                        if not left:
                            del pending[i]
    for s, _ in visitors:
        s.close()
    assert not pending, f"{len(pending)} visitors still missing replies after 5 tries"
    assert verified == 1500
    # One local session per visitor: the target saw 500 distinct source sockets.
    assert len(target.sources) == 500


def test_dns_like_request_response(udp_tunnel):
    def dns(query: bytes) -> bytes:
        qid, name = query[:2], query[2:].decode()
        return qid + f"{name}=10.0.{len(name)}.{sum(map(ord, name)) % 250}".encode()

    _, addr, _ = udp_tunnel(dns)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    names = [f"host{i}.example" for i in range(50)]
    ids = random.Random(9).sample(range(65536), 50)
    for qid, name in zip(ids, names):
        s.sendto(struct.pack(">H", qid) + name.encode(), addr)
    answers = {}
    while len(answers) < 50:
        data, _ = s.recvfrom(2048)
        answers[struct.unpack(">H", data[:2])[0]] = data[2:].decode()
    for qid, name in zip(ids, names):
        assert answers[qid] == f"{name}=10.0.{len(name)}.{sum(map(ord, name)) % 250}"
    s.close()


def test_large_and_empty_datagrams_keep_their_boundaries(udp_tunnel):
    _, addr, _ = udp_tunnel(lambda d: d, "plain", ["--compress"])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    for size in (65507, 0, 1, 30000):
        payload = os.urandom(size)
        s.sendto(payload, addr)
        got, _ = s.recvfrom(70000)
        assert got == payload
    s.close()
