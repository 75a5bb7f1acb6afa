"""SOCKS5 UDP ASSOCIATE through the tunnel (issue 14, "Through the tunnel"): `culvert
client -D` keeps the relay socket on the client and carries each association's
datagrams in one UDP exit stream to the server, which sends them under its exit policy.
PySocks is the independent client; raw sockets check drops and the association's end.
`-R proxy:` over dedicated data channels (--mux 0) refuses UDP ASSOCIATE (command not
supported); over carriers it works (test_proxy_reverse_udp.py).

Loopback only; every wait is bounded (ready lines, socket timeouts, polls)."""

from __future__ import annotations

import socket
import struct

from conftest import parse_addr
from proxy_support import EXPOSED_PROXY_RE, associate, check_association_ends_with_its_tcp, check_pysocks_echo_through_tunnel, start_dynamic, wrap

EXIT = ["--allow-exit", "--exit-allow", "127.0.0.0/8"]


def test_pysocks_echoes_200_datagrams_and_one_of_60000_bytes_through_the_exit(kit, udp_echo):
    server, client, proxy = start_dynamic(kit, EXIT)
    check_pysocks_echo_through_tunnel(proxy, udp_echo.port, server, client, r"exit udp association closed")


def test_names_resolve_at_the_exit_and_denied_destinations_are_dropped(kit, udp_echo):
    server, client, proxy = start_dynamic(kit, [*EXIT, "--exit-deny", f"127.0.0.2:{udp_echo.port}"])
    tcp, code, relay = associate(proxy)
    assert code == 0
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.settimeout(5)
    u.sendto(bytes([0, 0, 0, 3, 9]) + b"localhost" + struct.pack(">H", udp_echo.port) + b"by name", relay)
    assert u.recv(1000).endswith(b"by name")
    u.sendto(wrap(b"denied", udp_echo.port, host="127.0.0.2"), relay)
    u.sendto(wrap(b"after", udp_echo.port), relay)
    assert u.recv(1000).endswith(b"after")
    assert udp_echo.received == 2
    server.wait_stderr(r"exit datagram dropped")
    tcp.close()
    assert "dropped_denied=1" in server.wait_stderr(r"exit udp association closed")[0]
    client.wait_stderr(r"udp association closed")
    u.close()


def test_association_ends_with_its_tcp_connection_and_gives_descriptors_back(kit, udp_echo):
    server, client, proxy = start_dynamic(kit, EXIT)
    check_association_ends_with_its_tcp(proxy, udp_echo.port, server, client, r"exit udp association closed")


def test_server_without_allow_exit_refuses_udp_associate(kit):
    _, client, proxy = start_dynamic(kit, [])
    tcp, code, _ = associate(proxy)
    assert code == 0x02
    tcp.close()
    client.wait_stderr(r"proxy request refused|proxy requests refused")


def test_reverse_proxy_on_dedicated_channels_refuses_udp_associate(kit):
    server = kit.start_server("plain")
    client = kit.start_client(server.server_addr, ["proxy:127.0.0.1:0"], mode="plain", ready=False,
                              opts=["--no-auth", "--mux", "0"])
    public = parse_addr(client.wait_stdout(EXPOSED_PROXY_RE)[0].group(1))
    tcp, code, _ = associate(public)
    assert code == 0x07
    tcp.close()
