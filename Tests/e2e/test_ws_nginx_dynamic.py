"""`-D` through a tunnel that travels in WebSockets behind a real nginx terminating TLS
(issue 15's nginx bullet, "-D if the proxy issue is in"): a SOCKS5 and an HTTP fetch of
16 MiB through the client's proxy, leaving at the server, checked by SHA-256."""

from __future__ import annotations

from conftest import parse_addr
from proxy_support import BLOB_SHA, READY_RE as PROXY_RE, fetch_sha
from ws_support import ws_server


def test_dynamic_proxy_through_a_wss_tunnel_behind_nginx(kit, nginx, blob_origin):
    _, port = ws_server(kit, "ws", opts=["--allow-exit", "--exit-allow", "127.0.0.0/8"])
    front = nginx(port)
    client = kit.start_client(f"wss://localhost:{front.port}/tunnel", [], mode_args=["--ca", kit.certs.ca],
                              opts=["-D", "127.0.0.1:0", "--threads", "2"], ready=False)
    proxy = parse_addr(client.wait_stdout(PROXY_RE)[0].group(1))
    url = f"http://localhost:{blob_origin.port}/blob"
    assert fetch_sha(["--socks5-hostname", f"{proxy[0]}:{proxy[1]}"], url) == BLOB_SHA
    assert fetch_sha(["-x", f"http://{proxy[0]}:{proxy[1]}"], url) == BLOB_SHA
