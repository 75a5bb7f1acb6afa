"""A client on `--transport tls` or `plain` that reaches a `--transport ws` server is
told the server speaks WebSocket and how to name it (issue 15), exits 1 at once, and
the server logs one line naming the mismatch; a ws:// client that reaches a plain or
TLS server is told the likely cause."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("server_mode,transport", [("tls-psk", "tls"), ("plain", "plain")])
def test_a_ws_client_is_told_the_server_is_not_websocket(kit, server_mode, transport):
    """The plain or TLS server closes the upgrade unanswered (a plain server never answers
    garbage) with FIN, not a reset, and logs the mismatch; the client's error gives the fix."""
    srv = kit.start_server(server_mode)
    _, port = srv.server_addr
    cli = kit.start_client(f"ws://127.0.0.1:{port}/", ["0:127.0.0.1:9"], mode_args=[], ready=False)
    cli.wait_stderr(re.escape("without answering the WebSocket upgrade: a culvert server on --transport tls or plain (give it as HOST:PORT"),
                    timeout=10)
    assert not cli.stderr_matching(r"reset by peer"), cli.describe()
    srv.wait_stderr(rf'handshake failed .*error="the client speaks WebSocket \(a ws:// URL\); this server uses --transport {transport}', timeout=5)
    assert not srv.stderr_matching(r"exceeds the limit|wrong version number"), srv.describe()
