"""How the client names its servers when some are ws:// or wss:// URLs (issue 15 with
issue 16's failover): every log line, `/status` and `/metrics` name a URL entry by the URL
as written, path included, and a HOST:PORT entry by HOST:PORT. Two URLs that reach one
server on different paths (one by 127.0.0.1, one by localhost) stay apart in the logs."""

from __future__ import annotations

import json
import re
import urllib.request

from conftest import parse_addr
from tunnel_support import TunnelKit, assert_echoed, free_port, poll
from ws_support import ws_server

ADMIN_RE = re.compile(r"^listening admin (\S+)$")


def admin_get(client, path: str) -> str:
    host, port = parse_addr(client.wait_stdout(ADMIN_RE)[0].group(1))
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
        return r.read().decode()


def records(client, msg: str, key: str) -> list[str]:
    return [r[key] for r in client.records() if r["msg"] == msg and key in r]


def test_log_lines_name_a_url_server_by_its_url_and_a_plain_one_by_host_port(kit: TunnelKit):
    _, port = ws_server(kit, "ws")
    dead = free_port()
    wrong = f"ws://127.0.0.1:{port}/wrong"
    plain = f"127.0.0.1:{dead}"
    right = f"ws://localhost:{port}/tunnel"
    echo = kit.echo()
    client = kit.spawn(["client", f"{wrong},{plain},{right}", "-R", f"127.0.0.1:0:127.0.0.1:{echo.port}",
                        "--token-file", kit.token_file, "--failback-interval", "1s", "--reconnect-max", "1s",
                        "--threads", "2", "--log-level", "debug", "--admin", "127.0.0.1:0"])
    assert_echoed(client.exposed(1)[f"127.0.0.1:{echo.port}"], [b"ping"], timeout=10)

    unreachable = records(client, "cannot reach server", "target")
    assert unreachable[:2] == [wrong, plain], client.stderr_text()
    assert records(client, "connected to server", "target") == [right]
    assert records(client, "services held by server", "server") == [right]
    poll(lambda: {wrong, plain} <= set(records(client, "preferred server still unreachable", "target")), 10,
         "the failback probes of both earlier servers")

    assert json.loads(admin_get(client, "/status"))["server"] == right
    assert f'culvert_tunnel_server_info{{server="{right}"}} 1' in admin_get(client, "/metrics")
