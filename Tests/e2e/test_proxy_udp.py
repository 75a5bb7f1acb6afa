"""End-to-end tests of SOCKS5 UDP ASSOCIATE in `culvert proxy` (RFC 1928 §7): PySocks as
the independent client against a UDP echo, raw sockets for what PySocks cannot do
(fragments, datagrams from another source, the association's end).

Loopback only; every wait is bounded (ready lines, socket timeouts, polls)."""

from __future__ import annotations

import signal
import socket
import struct
import time

import pytest

from proxy_support import ProxyProc, pysocks_udp, recv_up_to, udp_echo_exchange
from tunnel_support import UdpServer


def associate(p: ProxyProc, host: str = "0.0.0.0", port: int = 0) -> tuple[socket.socket, bytes, tuple[str, int] | None]:
    """A raw UDP ASSOCIATE: the TCP connection, the reply code and the relay address."""
    s = socket.create_connection(p.address, timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert recv_up_to(s, 2) == b"\x05\x00"
    s.sendall(b"\x05\x03\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port))
    reply = recv_up_to(s, 10)
    assert len(reply) == 10, reply
    relay = (socket.inet_ntoa(reply[4:8]), struct.unpack(">H", reply[8:10])[0]) if reply[1] == 0 else None
    return s, reply[1:2], relay


def wrap(payload: bytes, port: int, frag: int = 0, host: str = "127.0.0.1") -> bytes:
    return bytes([0, 0, frag, 1]) + socket.inet_aton(host) + struct.pack(">H", port) + payload


def unwrap(datagram: bytes) -> tuple[tuple[str, int], bytes]:
    assert datagram[:4] == b"\x00\x00\x00\x01", datagram[:10]
    return (socket.inet_ntoa(datagram[4:8]), struct.unpack(">H", datagram[8:10])[0]), datagram[10:]


def udp_client(timeout: float = 5) -> socket.socket:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.settimeout(timeout)
    return u


# --------------------------------------------------------------------------


def test_pysocks_echoes_1000_datagrams_and_one_of_65000_bytes(proxy, udp_echo):
    p = proxy()
    u = pysocks_udp(p.address)
    udp_echo_exchange(u, ("127.0.0.1", udp_echo.port), count=1000, window=50, big=65000)
    u.close()
    line = p.wait_stderr(r"udp association closed")[0]
    assert "datagrams_up=1001" in line and "datagrams_down=1001" in line, line


def test_pysocks_sends_to_a_name_the_proxy_resolves(proxy, udp_echo):
    p = proxy()
    u = pysocks_udp(p.address)  # names go to the proxy to resolve (rdns)
    u.sendto(b"by name", ("localhost", udp_echo.port))
    data, source = u.recvfrom(1000)
    assert data == b"by name"
    # the reply's header names the address it came from, not the name asked for
    assert source[1] == udp_echo.port and source[0] in ("127.0.0.1", "::1")
    u.close()


def test_fragments_are_dropped_and_counted(proxy, udp_echo):
    p = proxy()
    tcp, code, relay = associate(p)
    assert code == b"\x00"
    assert relay[0] == "127.0.0.1"
    u = udp_client()
    u.sendto(wrap(b"fragment", udp_echo.port, frag=1), relay)
    u.sendto(wrap(b"whole", udp_echo.port), relay)
    source, payload = unwrap(u.recv(1000))
    assert payload == b"whole" and source == ("127.0.0.1", udp_echo.port)
    assert udp_echo.received == 1
    tcp.close()
    line = p.wait_stderr(r"udp association closed")[0]
    assert "dropped_fragment=1" in line and "reason=client closed" in line.replace('"', ""), line


def test_datagrams_from_another_source_are_ignored(proxy, udp_echo):
    p = proxy()
    # DST 0.0.0.0:0: the first datagram from the client's address fixes its port
    tcp, code, relay = associate(p)
    assert code == b"\x00"
    first, other = udp_client(), udp_client(timeout=0.5)
    first.sendto(wrap(b"one", udp_echo.port), relay)
    assert unwrap(first.recv(1000))[1] == b"one"
    other.sendto(wrap(b"intruder", udp_echo.port), relay)
    first.sendto(wrap(b"two", udp_echo.port), relay)
    assert unwrap(first.recv(1000))[1] == b"two"
    with pytest.raises(socket.timeout):
        other.recv(1000)
    assert udp_echo.received == 2
    tcp.close()
    # a request that names its port takes datagrams from that port only, the first included
    named = udp_client()
    tcp, code, relay = associate(p, "127.0.0.1", named.getsockname()[1])
    other.sendto(wrap(b"intruder", udp_echo.port), relay)
    named.sendto(wrap(b"three", udp_echo.port), relay)
    assert unwrap(named.recv(1000))[1] == b"three"
    assert udp_echo.received == 3
    tcp.close()
    lines = p.wait_stderr(r"udp association closed", count=2)
    assert all("dropped_foreign=1" in line for line in lines), lines


def test_association_ends_with_its_tcp_connection(proxy, udp_echo):
    p = proxy()
    tcp, _, relay = associate(p)
    u = udp_client()
    u.connect(relay)
    u.send(wrap(b"ping", udp_echo.port))
    assert unwrap(u.recv(1000))[1] == b"ping"
    tcp.close()
    p.wait_stderr(r"udp association closed")
    # the relay socket is gone: the kernel answers port unreachable
    u.send(wrap(b"late", udp_echo.port))
    with pytest.raises(ConnectionRefusedError):
        u.recv(1000)


def test_idle_association_closes_its_tcp_connection(proxy, udp_echo):
    p = proxy("--udp-idle-timeout", "500ms")
    tcp, _, relay = associate(p)
    u = udp_client()
    u.sendto(wrap(b"ping", udp_echo.port), relay)
    assert unwrap(u.recv(1000))[1] == b"ping"
    start = time.monotonic()
    tcp.settimeout(10)
    assert tcp.recv(100) == b""
    assert 0.4 < time.monotonic() - start < 5
    assert "reason=idle timeout" in p.wait_stderr(r"udp association closed")[0].replace('"', "")


def test_policy_applies_to_datagrams(proxy, udp_echo):
    p = proxy("--deny", f"127.0.0.1:{udp_echo.port}")
    tcp, _, relay = associate(p)
    u = udp_client(timeout=0.5)
    u.sendto(wrap(b"denied", udp_echo.port), relay)
    u.sendto(bytes([0, 0, 0, 3, 9]) + b"localhost" + struct.pack(">H", udp_echo.port) + b"by name", relay)
    with pytest.raises(socket.timeout):
        u.recv(1000)
    assert udp_echo.received == 0
    p.wait_stderr(r"proxy datagram dropped")
    tcp.close()
    assert "dropped_denied=2" in p.wait_stderr(r"udp association closed")[0]


def test_association_limit_answers_general_failure(proxy):
    p = proxy("--max-udp-associations", "1")
    first, code, _ = associate(p)
    assert code == b"\x00"
    second, code, _ = associate(p)
    assert code == b"\x01"
    second.close()
    first.close()
    p.wait_stderr(r"udp association closed")
    third, code, _ = associate(p)
    assert code == b"\x00"
    third.close()


def test_drain_ends_associations_at_once(proxy, udp_echo):
    p = proxy("--drain-timeout", "30s")
    tcp, _, relay = associate(p)
    u = udp_client()
    u.sendto(wrap(b"ping", udp_echo.port), relay)
    assert unwrap(u.recv(1000))[1] == b"ping"
    start = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait_exit(10) == 0
    assert time.monotonic() - start < 5
    tcp.settimeout(5)
    assert tcp.recv(100) == b""


def test_more_destinations_than_sockets_per_association(proxy):
    # An association keeps 16 destination sockets; the 17th and later reuse the least
    # recently used one's place, and a destination whose socket went gets a new one.
    echoes = [UdpServer(lambda data: data) for _ in range(20)]
    try:
        p = proxy()
        u = pysocks_udp(p.address)
        for echo in echoes + echoes[:3]:
            u.sendto(b"to %d" % echo.port, ("127.0.0.1", echo.port))
            data, source = u.recvfrom(1000)
            assert data == b"to %d" % echo.port and source == ("127.0.0.1", echo.port)
        u.close()
        line = p.wait_stderr(r"udp association closed")[0]
        assert "datagrams_down=23" in line and "dropped" not in line, line
    finally:
        for echo in echoes:
            echo.close()
