"""SOCKS5 UDP ASSOCIATE through the reverse proxy (issue 14, "Both directions support UDP
ASSOCIATE"): `culvert client -R proxy:` listens on the server; an association's relay
socket is bound there too (a relay stream on the visitor's carrier), and the client, the
exit, sends its datagrams from its own network under --exit-allow/--exit-deny. PySocks is
the independent client; raw sockets check the policy and the association's end.

Loopback only; every wait is bounded (ready lines, socket timeouts, polls)."""

from __future__ import annotations

import os
import socket

from conftest import parse_addr
from proxy_support import EXPOSED_PROXY_RE, associate, check_association_ends_with_its_tcp, check_pysocks_echo_through_tunnel, wrap


def start_reverse(kit, client_opts: list[str] = ()):
    """A server without --allow-exit (the client is the exit) and a client exposing a
    reverse proxy on the server's loopback; returns both and the proxy's address."""
    server = kit.start_server("plain")
    client = kit.start_client(server.server_addr, ["proxy:127.0.0.1:0"], mode="plain", ready=False,
                              opts=["--no-auth", *client_opts])
    return server, client, parse_addr(client.wait_stdout(EXPOSED_PROXY_RE)[0].group(1))


def test_pysocks_echoes_200_datagrams_and_one_of_60000_bytes_through_the_reverse_proxy(kit, udp_echo):
    server, client, proxy = start_reverse(kit)
    check_pysocks_echo_through_tunnel(proxy, udp_echo.port, server, client, r"reverse udp relay closed")


def test_relay_is_on_the_server_and_the_clients_exit_policy_drops_denied_destinations(kit, udp_echo):
    server, client, proxy = start_reverse(kit, ["--exit-deny", f"127.0.0.2:{udp_echo.port}"])
    tcp, code, relay = associate(proxy)
    assert code == 0
    # The relay socket the reply names is the server's, not the client's.
    assert relay[1] in udp_ports(server.pid) and relay[1] not in udp_ports(client.pid)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.settimeout(5)
    u.sendto(bytes([0, 0, 0, 3, 9]) + b"localhost" + (udp_echo.port).to_bytes(2, "big") + b"by name", relay)
    assert u.recv(1000).endswith(b"by name")
    u.sendto(wrap(b"denied", udp_echo.port, host="127.0.0.2"), relay)
    u.sendto(wrap(b"after", udp_echo.port), relay)
    assert u.recv(1000).endswith(b"after")
    assert udp_echo.received == 2
    tcp.close()
    assert "dropped_denied=1" in client.wait_stderr(r"udp association closed")[0]
    server.wait_stderr(r"reverse udp relay closed")
    u.close()


def udp_ports(pid: int) -> set[int]:
    """The local ports of the IPv4 UDP sockets process `pid` holds (/proc: its socket
    inodes looked up in the namespace's UDP table)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    with open(f"/proc/{pid}/net/udp") as table:
        for row in list(table)[1:]:
            fields = row.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


def test_association_ends_with_its_tcp_connection_and_gives_descriptors_back(kit, udp_echo):
    server, client, proxy = start_reverse(kit)
    check_association_ends_with_its_tcp(proxy, udp_echo.port, server, client, r"reverse udp relay closed")


def test_datagrams_from_another_address_than_the_visitors_are_dropped(kit, udp_echo):
    _, client, proxy = start_reverse(kit)
    tcp, code, relay = associate(proxy)
    assert code == 0
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.5", 0))
    stranger.sendto(wrap(b"foreign", udp_echo.port), relay)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(wrap(b"mine", udp_echo.port), relay)
    assert u.recv(1000).endswith(b"mine")
    assert udp_echo.received == 1
    tcp.close()
    client.wait_stderr(r"udp association closed")
    stranger.close()
    u.close()


def test_a_server_whose_allowed_ports_leave_out_the_ephemeral_range_refuses_the_relay(kit):
    server = kit.start_server("plain", opts=["--allow-ports", "20000-20999"])
    client = kit.start_client(server.server_addr, ["proxy:127.0.0.1:0"], mode="plain", ready=False, opts=["--no-auth"])
    proxy = parse_addr(client.wait_stdout(EXPOSED_PROXY_RE)[0].group(1))
    tcp, code, _ = associate(proxy)
    assert code == 0x01
    tcp.close()
    assert "ephemeral" in server.wait_stderr(r"UDP relay refused")[0]
    client.wait_stderr(r"proxy request refused|proxy requests refused")
