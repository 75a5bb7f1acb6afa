"""Faults for UDP services through the tunnel: a flood of visitor addresses (they cost
a sender nothing and can be spoofed) must meet the client's per-service session cap,
not its descriptor limit, and leave its other services and its log alone."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time

from tunnel_support import UdpServer, echo_many, poll

EXPOSED_ANY_RE = re.compile(r"^exposed (tcp|udp) (\S+) -> (\S+)$")
FLOOD_HOSTS = [f"127.0.0.{x}" for x in range(2, 202)]
PORTS_PER_HOST = 15  # 200 hosts x 15 ports = 3,000 visitor addresses


class Visitor:
    """A UDP visitor that sends a numbered datagram every `period` and records which
    came back byte for byte."""

    def __init__(self, addr: tuple[str, int], period: float = 0.05):
        self.addr = addr
        self.period = period
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.02)
        self.sent: dict[int, bytes] = {}
        self.echoed: set[int] = set()
        self.mismatched = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def _run(self):
        seq = 0
        next_send = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_send:
                payload = seq.to_bytes(4, "big") + os.urandom(60)
                self.sent[seq] = payload
                self.sock.sendto(payload, self.addr)
                seq += 1
                next_send += self.period
            try:
                data, _ = self.sock.recvfrom(2048)
            except (socket.timeout, BlockingIOError):
                continue
            n = int.from_bytes(data[:4], "big")
            if self.sent.get(n) == data:
                self.echoed.add(n)
            else:
                self.mismatched += 1

    def echoed_between(self, first: int, last: int) -> int:
        return sum(1 for n in range(first, last) if n in self.echoed)

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def flood(addr: tuple[str, int], per_source: int = 3, pace: float = 2.0) -> int:
    """Datagrams from 3,000 visitor addresses, spread over about `pace` seconds; the
    sockets close at once, so the echoes have nowhere to go."""
    sent = 0
    started = time.monotonic()
    for i, host in enumerate(FLOOD_HOSTS):
        socks = []
        for _ in range(PORTS_PER_HOST):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((host, 0))
            socks.append(s)
        for _ in range(per_source):
            for s in socks:
                s.sendto(b"flood %d" % sent, addr)
                sent += 1
        for s in socks:
            s.close()
        ahead = started + pace * (i + 1) / len(FLOOD_HOSTS) - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    return sent


def first_echo(addr: tuple[str, int], timeout: float) -> float | None:
    """Seconds until a new visitor's datagram came back byte for byte (resent every
    100 ms), or None."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.1)
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout:
            payload = os.urandom(48)
            s.sendto(payload, addr)
            try:
                data, _ = s.recvfrom(2048)
            except socket.timeout:
                continue
            if data == payload:
                return time.monotonic() - started
        return None
    finally:
        s.close()


def test_address_flood_meets_the_session_cap_not_the_descriptor_limit(kit):
    udp = UdpServer(lambda datagram: datagram)
    try:
        tcp = kit.echo()
        server = kit.start_server("plain")
        client = kit.spawn(
            ["client", f"127.0.0.1:{server.server_addr[1]}", "--token-file", kit.token_file, "--transport", "plain",
             "-R", f"udp:127.0.0.1:0:127.0.0.1:{udp.port}", "-R", f"127.0.0.1:0:127.0.0.1:{tcp.port}",
             "--udp-idle-timeout", "500ms"],
            prefix=["prlimit", "--nofile=512:512"])
        exposed = {m.group(1): m.group(2) for m in client.wait_stdout(EXPOSED_ANY_RE, 2, 15)}
        udp_addr = ("127.0.0.1", int(exposed["udp"].rsplit(":", 1)[1]))
        tcp_addr = ("127.0.0.1", int(exposed["tcp"].rsplit(":", 1)[1]))
        assert first_echo(udp_addr, 5) is not None, "the UDP service does not echo before the flood"

        before = Visitor(udp_addr)
        before.start()
        poll(lambda: len(before.echoed) >= 5, 5, "echoes of the visitor from before the flood")

        payloads = [os.urandom(1 << 20) for _ in range(4)]
        transfers: dict = {}

        def transfer():
            transfers["during"] = echo_many(tcp_addr, payloads, timeout=30)

        tcp_thread = threading.Thread(target=transfer, daemon=True)
        flood_from = len(before.sent)
        flood_started = time.monotonic()
        flood_thread = threading.Thread(target=lambda: transfers.setdefault("flooded", flood(udp_addr)), daemon=True)
        flood_thread.start()
        time.sleep(0.5)  # well into the flood: about 750 of the 3,000 addresses have sent
        tcp_thread.start()
        flood_thread.join(10)
        flood_ended = time.monotonic()
        flood_to = len(before.sent)
        tcp_thread.join(30)
        assert not flood_thread.is_alive() and flood_ended - flood_started < 5
        assert transfers["flooded"] == 3 * len(FLOOD_HOSTS) * PORTS_PER_HOST

        # A new visitor is served within 2 s of the flood's end (its sessions idle out).
        waited = first_echo(udp_addr, 5)
        assert waited is not None and waited < 2, \
            f"a new visitor waited {waited} s after the flood\n{client.describe()}"

        assert client.running, client.describe()
        assert not tcp_thread.is_alive(), "the TCP transfer during the flood did not finish"
        expected = {i: (len(p), hashlib.sha256(p).hexdigest()) for i, p in enumerate(payloads)}
        assert transfers["during"] == expected
        after = echo_many(tcp_addr, payloads[:1], timeout=15)
        assert after == {0: expected[0]}

        # The visitor from before kept its session: its echoes came back, byte for byte.
        tail_from = len(before.sent)
        poll(lambda: before.echoed_between(tail_from, tail_from + 10) == 10, 5, "echoes after the flood")
        before.stop()
        assert before.mismatched == 0
        during = flood_to - flood_from
        assert before.echoed_between(flood_from, flood_to) >= 0.9 * during, \
            f"{before.echoed_between(flood_from, flood_to)} of {during} echoes during the flood"

        # The flood is reported in a few summary lines, not one line per datagram.
        stderr = client.stderr_text().splitlines()
        summaries = [l for l in stderr if "UDP datagrams dropped" in l]
        assert 1 <= len(summaries) <= 8, "\n".join(stderr[-20:])
        assert sum(int(m) for l in summaries for m in re.findall(r"session_limit=(\d+)", l)) > 0
        assert not [l for l in stderr if "unreachable" in l], "\n".join(stderr[-20:])
        assert len(stderr) < 40, f"{len(stderr)} lines on stderr"
    finally:
        udp.close()
