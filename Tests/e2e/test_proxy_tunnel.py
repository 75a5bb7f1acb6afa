"""Proxies through the tunnel (issue 14, "Through the tunnel"): `culvert client -D`
(the proxy on the client, the server as exit with --allow-exit and its exit policy) and
`-R proxy:` (the proxy on the server's public port, the client as exit), driven by curl.
UDP ASSOCIATE through the tunnel is in test_proxy_tunnel_udp.py."""

from __future__ import annotations

import socket
import struct

from conftest import parse_addr, recv_exactly, run_culvert
from proxy_support import BLOB_SHA, EXPOSED_PROXY_RE, BlobHandler, Origin, curl, fetch_sha, start_dynamic
from tunnel_support import settle_fd_count


def http_status(proxy: tuple[str, int], url: str, user: str | None = None) -> int:
    auth = f"{user}@" if user else ""
    r = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://{auth}{proxy[0]}:{proxy[1]}", url)
    return int(r.stdout or b"0")


def socks_reply(proxy: tuple[str, int], host: str, port: int, auth: tuple[bytes, bytes] | None = None) -> int:
    """The reply code of a raw SOCKS5 CONNECT by name (or the failed auth status + 0x100)."""
    with socket.create_connection(proxy, timeout=15) as s:
        s.sendall(b"\x05\x01" + (b"\x02" if auth else b"\x00"))
        choice = recv_exactly(s, 2)
        if auth:
            user, password = auth
            s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            status = recv_exactly(s, 2)
            if status[1] != 0:
                return 0x100 + status[1]
        assert choice[1] in (0, 2)
        name = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
        return recv_exactly(s, 4)[1]


def test_dynamic_proxy_carries_16_mib_by_name_and_over_http(kit, blob_origin):
    server, client, proxy = start_dynamic(kit, ["--allow-exit", "--exit-allow", "127.0.0.0/8"])
    url = f"http://localhost:{blob_origin.port}/blob"
    # One transfer first: the loops' pipe pools keep the pipes a splicing relay took.
    assert fetch_sha(["--socks5-hostname", f"{proxy[0]}:{proxy[1]}"], url) == BLOB_SHA
    base = {p: settle_fd_count(p.pid) for p in (server, client)}
    assert fetch_sha(["--socks5-hostname", f"{proxy[0]}:{proxy[1]}"], url) == BLOB_SHA
    assert fetch_sha(["-x", f"http://{proxy[0]}:{proxy[1]}"], f"http://127.0.0.1:{blob_origin.port}/blob") == BLOB_SHA
    assert fetch_sha(["-p", "-x", f"http://{proxy[0]}:{proxy[1]}"], url) == BLOB_SHA
    # The exit dialed: its close line names the destination.
    server.wait_stderr(r"connection closed.*exit=localhost:%d" % blob_origin.port)
    for p, before in base.items():
        assert settle_fd_count(p.pid) <= before, p.describe()


def test_server_without_allow_exit_refuses_and_client_says_so_once(kit, blob_origin):
    _, client, proxy = start_dynamic(kit, [])
    assert http_status(proxy, f"http://127.0.0.1:{blob_origin.port}/") == 403
    assert socks_reply(proxy, "localhost", blob_origin.port) == 0x02
    assert socks_reply(proxy, "localhost", blob_origin.port) == 0x02
    client.wait_stderr("the server does not allow exits")  # the log reader may trail the replies
    assert client.count_stderr("the server does not allow exits") == 1, client.describe()


def test_exit_denies_loopback_by_default(kit, blob_origin):
    server, _, proxy = start_dynamic(kit, ["--allow-exit"])
    assert http_status(proxy, f"http://127.0.0.1:{blob_origin.port}/") == 403
    assert socks_reply(proxy, "localhost", blob_origin.port) == 0x02
    server.wait_stderr(r"exit request refused.*destination=localhost:%d" % blob_origin.port)


def test_exit_deny_wins_over_exit_allow(kit, blob_origin):
    _, _, proxy = start_dynamic(kit, ["--allow-exit", "--exit-allow", "127.0.0.0/8",
                                      "--exit-deny", f"127.0.0.1:{blob_origin.port}"])
    assert http_status(proxy, f"http://127.0.0.1:{blob_origin.port}/") == 403
    assert socks_reply(proxy, "localhost", blob_origin.port) == 0x02
    other = Origin(BlobHandler)
    try:
        assert http_status(proxy, f"http://127.0.0.1:{other.port}/") == 200
    finally:
        other.close()


def test_exit_failures_map_to_reply_codes(kit):
    _, _, proxy = start_dynamic(kit, ["--allow-exit", "--exit-allow", "127.0.0.0/8"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert socks_reply(proxy, "127.0.0.1", closed_port) == 0x05
    assert http_status(proxy, f"http://127.0.0.1:{closed_port}/") == 502
    assert socks_reply(proxy, "no-such-host.invalid", 80) == 0x04


def test_reverse_proxy_reaches_a_service_only_the_client_sees(kit, tmp_path):
    hidden = Origin(BlobHandler, "127.0.0.5")
    try:
        auth = tmp_path / "users"
        auth.write_text("alice:s3cret\n")
        server = kit.start_server("plain")
        client = kit.start_client(server.server_addr, ["proxy:127.0.0.1:0"], mode="plain", ready=False,
                                  opts=["--proxy-auth-file", str(auth), "--exit-allow", "127.0.0.5"])
        public = parse_addr(client.wait_stdout(EXPOSED_PROXY_RE)[0].group(1))
        url = f"http://127.0.0.5:{hidden.port}/blob"
        # Warm-up as above: the relay of a SOCKS connection splices, with pooled pipes.
        assert fetch_sha(["--socks5-hostname", f"{public[0]}:{public[1]}", "--proxy-user", "alice:s3cret"], url) == BLOB_SHA
        base = {p: settle_fd_count(p.pid) for p in (server, client)}
        assert fetch_sha(["-x", f"http://alice:s3cret@{public[0]}:{public[1]}"], url) == BLOB_SHA
        assert fetch_sha(["--socks5-hostname", f"{public[0]}:{public[1]}", "--proxy-user", "alice:s3cret"], url) == BLOB_SHA
        assert http_status(public, url) == 407
        assert socks_reply(public, "127.0.0.5", hidden.port, auth=(b"alice", b"wrong")) == 0x101
        # The client's exit policy: only what --exit-allow names.
        assert socks_reply(public, "127.0.0.1", hidden.port, auth=(b"alice", b"s3cret")) == 0x02
        for p, before in base.items():
            assert settle_fd_count(p.pid) <= before, p.describe()
    finally:
        hidden.close()


def test_unauthenticated_public_proxies_need_no_auth(culvert_path, kit):
    r = run_culvert(culvert_path, ["client", "127.0.0.1:1", "--token-file", kit.token_file, "-R", "proxy:0"])
    assert r.returncode == 2 and "--no-auth" in r.stderr, r.stderr
    r = run_culvert(culvert_path, ["client", "127.0.0.1:1", "--token-file", kit.token_file, "-D", "0.0.0.0:0"])
    assert r.returncode == 2 and "--no-auth" in r.stderr, r.stderr
    r = run_culvert(culvert_path, ["client", "127.0.0.1:1", "--token-file", kit.token_file, "-D", "0", "--mux", "0"])
    assert r.returncode == 2 and "-D needs" in r.stderr, r.stderr
