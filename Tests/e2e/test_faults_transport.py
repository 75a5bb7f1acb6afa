"""Clear messages: one end on `--transport plain`, the other on TLS (the default). The
client must exit 1 at once naming the setting to change, instead of retrying forever
with `Connection reset by peer`, and the server logs one line per attempt that names
the mismatch, not `wrong version number` or `frame of N bytes exceeds the limit`
(issue 13, clear messages)."""

from __future__ import annotations

import time

import pytest



# (server mode, client mode, client's message, server's line)
CASES = {
    "plain-server-tls-client": (
        "plain", "tls-psk",
        "culvert: the server uses --transport plain; give --transport plain on the client too",
        r'handshake failed .*error="the client speaks TLS; this server uses --transport plain',
    ),
    "tls-server-plain-client": (
        "tls-psk", "plain",
        "culvert: the server uses TLS; drop --transport plain",
        r'handshake failed .*error="the client uses --transport plain; this server uses TLS',
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transport_mismatch_is_named(kit, case):
    server_mode, client_mode, message, server_line = CASES[case]
    srv = kit.start_server(server_mode)
    started = time.monotonic()
    cli = kit.start_client(srv.server_addr, ["0:127.0.0.1:9"], client_mode, ready=False)
    rc = cli.wait_exit(5)
    assert rc == 1, cli.describe()
    assert time.monotonic() - started < 5, cli.describe()
    assert message in cli.stderr_text(), cli.describe()
    assert not cli.stdout_lines, cli.describe()
    assert not cli.stderr_matching(r"reset by peer|retrying|reconnect"), cli.describe()

    srv.wait_stderr(server_line, timeout=5)
    # The client gave up after one attempt: one line, and none of the old confusing ones.
    time.sleep(0.5)
    assert len(srv.stderr_matching(r"handshake failed")) == 1, srv.describe()
    assert not srv.stderr_matching(r"exceeds the limit|wrong version number|client connected"), srv.describe()


@pytest.mark.parametrize("case", list(CASES))
def test_transport_mismatch_every_attempt_is_named(kit, case):
    """Each new attempt gets its own line and its own clear exit."""
    server_mode, client_mode, message, server_line = CASES[case]
    srv = kit.start_server(server_mode)
    for attempt in range(1, 4):
        cli = kit.start_client(srv.server_addr, ["0:127.0.0.1:9"], client_mode, ready=False)
        assert cli.wait_exit(5) == 1, cli.describe()
        assert message in cli.stderr_text(), cli.describe()
        srv.wait_stderr(server_line, count=attempt, timeout=5)
    assert not srv.stderr_matching(r"exceeds the limit|wrong version number"), srv.describe()
