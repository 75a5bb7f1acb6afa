"""`reverse_proxy` in the client's config file (issue 14, "TOML: the same as keys in the
client and server config files"): the same as `-R proxy:[BIND:]REMOTE_PORT`, with the
file's exit_allow/exit_deny applied at the client; its mistakes are usage errors naming
the key.

Loopback only; every wait is bounded (ready lines, socket timeouts, polls)."""

from __future__ import annotations

import socket

from conftest import parse_addr, round_trip, run_culvert
from proxy_support import EXPOSED_PROXY_RE, connect_code


def client_file(kit, tmp_path, server, extra: str):
    conf = tmp_path / "client.toml"
    conf.write_text(f'server = "127.0.0.1:{server.server_addr[1]}"\ntoken_file = "{kit.token_file}"\n'
                    f'transport = "plain"\n{extra}')
    return conf


def test_reverse_proxy_from_the_file_exits_through_the_client_under_its_policy(kit, tmp_path):
    allowed, denied = kit.echo(), kit.echo()
    server = kit.start_server("plain")
    conf = client_file(kit, tmp_path, server,
                       f'reverse_proxy = ["127.0.0.1:0"]\nexit_deny = ["127.0.0.1:{denied.port}"]\n')
    client = kit.spawn(["client", "-c", str(conf)])
    proxy = parse_addr(client.wait_stdout(EXPOSED_PROXY_RE)[0].group(1))
    assert connect_code(proxy, denied.port) == 0x02
    with socket.create_connection(proxy, timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x03\x09localhost" + allowed.port.to_bytes(2, "big"))
        assert s.recv(10)[1] == 0x00
        round_trip(s, b"through a reverse proxy from the config file")


def test_reverse_proxy_mistakes_in_the_file_are_usage_errors(kit, culvert_path, tmp_path):
    server = kit.start_server("plain")
    conf = client_file(kit, tmp_path, server, 'reverse_proxy = ["127.0.0.1:port"]\n')
    r = run_culvert(culvert_path, ["client", "-c", str(conf)])
    assert r.returncode == 2 and "reverse_proxy" in r.stderr and "'port'" in r.stderr, r.stderr
    conf = client_file(kit, tmp_path, server, 'reverse_proxy = ["0.0.0.0:0"]\n')
    r = run_culvert(culvert_path, ["client", "-c", str(conf)])
    assert r.returncode == 2 and "--no-auth" in r.stderr, r.stderr
