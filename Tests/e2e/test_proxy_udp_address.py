"""The address a SOCKS5 UDP ASSOCIATE reply names (RFC 1928 §6, BND.ADDR/BND.PORT): a
proxy listening on a wildcard address names the concrete address the client reached it
on, never 0.0.0.0 or ::, and its relay socket is bound there, so a client that sends to
exactly what the reply says gets its echo back from that address. Checked for
`culvert proxy` (IPv4 and IPv6), `client -D` and the reverse `-R proxy:` relay on the
server, with a raw SOCKS5 client.

Loopback only; every wait is bounded (ready lines, socket timeouts)."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from conftest import parse_addr, recv_exactly
from proxy_support import EXPOSED_PROXY_RE, READY_RE


class UdpEcho:
    """A UDP echo on `host` (IPv4 or IPv6) from one thread, until close()."""

    def __init__(self, host: str):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            self.sock.sendto(data, source)

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def echo4():
    e = UdpEcho("127.0.0.1")
    yield e
    e.close()


@pytest.fixture
def echo6():
    e = UdpEcho("::1")
    yield e
    e.close()


def socks_address(host: str, port: int) -> bytes:
    """ATYP, address and port as RFC 1928 writes them."""
    if ":" in host:
        return b"\x04" + socket.inet_pton(socket.AF_INET6, host) + struct.pack(">H", port)
    return b"\x01" + socket.inet_aton(host) + struct.pack(">H", port)


def read_socks_address(data: bytes) -> tuple[tuple[str, int], int]:
    """The address at the start of `data` and how many bytes it took."""
    if data[0] == 1:
        return (socket.inet_ntoa(data[1:5]), struct.unpack(">H", data[5:7])[0]), 7
    assert data[0] == 4, data[:20]
    return (socket.inet_ntop(socket.AF_INET6, data[1:17]), struct.unpack(">H", data[17:19])[0]), 19


def associate(proxy: tuple[str, int]) -> tuple[socket.socket, tuple[str, int]]:
    """A raw UDP ASSOCIATE (DST 0.0.0.0:0, or :: on IPv6): the TCP connection and BND."""
    v6 = ":" in proxy[0]
    s = socket.create_connection(proxy, timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert recv_exactly(s, 2) == b"\x05\x00"
    s.sendall(b"\x05\x03\x00" + socks_address("::" if v6 else "0.0.0.0", 0))
    head = recv_exactly(s, 4)
    assert head[:3] == b"\x05\x00\x00", head
    rest = recv_exactly(s, 18 if head[3] == 4 else 6)
    bound, _ = read_socks_address(head[3:] + rest)
    return s, bound


def echo_through(bound: tuple[str, int], target: tuple[str, int]) -> None:
    """Sends one datagram to the relay at exactly `bound` and checks the echo: it comes
    from `bound`, with `target` as its source in the SOCKS header."""
    u = socket.socket(socket.AF_INET6 if ":" in bound[0] else socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    try:
        payload = b"to the address the reply named"
        u.sendto(b"\x00\x00\x00" + socks_address(*target) + payload, bound)
        data, source = u.recvfrom(65535)
        assert source[:2] == bound
        assert data[:3] == b"\x00\x00\x00"
        origin, n = read_socks_address(data[3:])
        assert origin == target and data[3 + n:] == payload
    finally:
        u.close()


def check(proxy: tuple[str, int], expected_host: str, target: tuple[str, int]) -> None:
    tcp, bound = associate(proxy)
    try:
        assert bound[0] == expected_host and bound[1] != 0, bound
        echo_through(bound, target)
    finally:
        tcp.close()


def test_proxy_on_ipv4_wildcard_names_the_address_the_client_reached(proxy, echo4):
    p = proxy("--no-auth", listen="0.0.0.0:0")
    check(("127.0.0.1", p.address[1]), "127.0.0.1", ("127.0.0.1", echo4.port))


def test_proxy_on_ipv6_loopback_relays_to_an_ipv6_echo(proxy, echo6):
    p = proxy(listen="[::1]:0")
    check(("::1", p.address[1]), "::1", ("::1", echo6.port))


def test_proxy_on_ipv6_wildcard_names_the_address_the_client_reached(proxy, echo6):
    p = proxy("--no-auth", listen="[::]:0")
    check(("::1", p.address[1]), "::1", ("::1", echo6.port))


def test_dynamic_proxy_on_wildcard_names_the_address_the_client_reached(kit, echo4):
    server = kit.start_server("plain", opts=["--allow-exit", "--exit-allow", "127.0.0.0/8"])
    client = kit.start_client(server.server_addr, [], mode="plain", opts=["-D", "0.0.0.0:0", "--no-auth"], ready=False)
    port = parse_addr(client.wait_stdout(READY_RE)[0].group(1))[1]
    check(("127.0.0.1", port), "127.0.0.1", ("127.0.0.1", echo4.port))


def test_reverse_proxy_on_wildcard_binds_its_relay_where_the_visitor_reaches_the_server(kit, echo4):
    server = kit.start_server("plain", opts=["--bind-addr", "0.0.0.0"])
    client = kit.start_client(server.server_addr, ["proxy:0.0.0.0:0"], mode="plain", ready=False, opts=["--no-auth"])
    exposed = parse_addr(client.wait_stdout(EXPOSED_PROXY_RE)[0].group(1))
    server.wait_stderr(rf"service exposed listen=0\.0\.0\.0:{exposed[1]} ")
    check(("127.0.0.1", exposed[1]), "127.0.0.1", ("127.0.0.1", echo4.port))
    server.wait_stderr(r"reverse udp relay closed.*relay=127\.0\.0\.1:")
