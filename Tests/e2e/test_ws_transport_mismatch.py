"""A client on `--transport tls` or `plain` that reaches a `--transport ws` server is
told the server speaks WebSocket and how to name it (issue 15), exits 1 at once, and
the server logs one line naming the mismatch."""

from __future__ import annotations

import pytest

MESSAGE = "culvert: the server speaks WebSocket (--transport ws/wss); give the server as ws://HOST:PORT/PATH"
SERVER_LINE = r'handshake failed .*error="the client connects with --transport tls or plain; this server uses --transport ws/wss'


@pytest.mark.parametrize("client_mode", ["tls-psk", "plain"])
def test_a_tls_or_plain_client_is_told_the_server_speaks_websocket(kit, client_mode):
    srv = kit.start_server("tls-psk", ["--transport", "ws"])
    cli = kit.start_client(srv.server_addr, ["0:127.0.0.1:9"], client_mode, ready=False)
    assert cli.wait_exit(5) == 1, cli.describe()
    assert MESSAGE in cli.stderr_text(), cli.describe()
    assert not cli.stderr_matching(r"uses --transport plain|uses TLS|reconnect"), cli.describe()
    srv.wait_stderr(SERVER_LINE, timeout=5)
