"""Shared pieces of the `culvert proxy` tests: the running proxy (its fixture `proxy` is in
conftest) and the UDP ASSOCIATE echo exchange (local and through the tunnel)."""

from __future__ import annotations

import hashlib
import re
import struct

from conftest import Culvert, parse_addr

READY_RE = re.compile(r"^listening proxy (\S+)$")


class ProxyProc(Culvert):
    """A running `culvert proxy`, past its ready line."""

    def __init__(self, path: str, args: list[str]):
        super().__init__(path, ["proxy", *args])
        self.address = parse_addr(self.wait_stdout(READY_RE)[0].group(1))


def udp_echo_exchange(u, target: tuple[str, int], count: int, window: int, big: int) -> None:
    """Through the SOCKS5 UDP socket `u`: `count` numbered datagrams of varied sizes to
    the echo at `target`, `window` in flight at a time, every reply from `target` and
    their SHA-256 equal to what was sent; then one datagram of `big` bytes, echoed whole."""
    sent, got = hashlib.sha256(), {}
    for start in range(0, count, window):
        for i in range(start, min(start + window, count)):
            payload = struct.pack(">I", i) + hashlib.sha256(str(i).encode()).digest() * (1 + i % 40)
            sent.update(payload)
            u.sendto(payload, target)
        while len(got) < min(start + window, count):
            data, source = u.recvfrom(65535)
            assert source == target
            got[struct.unpack(">I", data[:4])[0]] = data
    back = hashlib.sha256()
    for i in range(count):
        back.update(got[i])
    assert back.hexdigest() == sent.hexdigest()
    block = (bytes(range(256)) * (big // 256 + 1))[:big]
    u.sendto(block, target)
    data, _ = u.recvfrom(65535)
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(block).hexdigest()
