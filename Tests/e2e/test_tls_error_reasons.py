"""End-to-end: a TLS channel that fails at the TLS level is logged with OpenSSL's
reason, not a bare EPROTO, so the log tells a vanished peer from a corrupted stream."""

from __future__ import annotations

import signal

from conftest import echo_once
from tunnel_support import local_of


def test_server_killed_client_logs_the_unexpected_eof_on_both_channels(kit):
    echo = kit.echo()
    srv = kit.start_server("tls-psk")
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], "tls-psk", opts=["--mux", "1"])
    # a visitor served through the carrier: both channels are up
    echo_once(cli.exposed_map[local_of(echo)], b"carrier up")
    # SIGKILL: the kernel closes the server's sockets with no close_notify
    srv.send_signal(signal.SIGKILL)
    srv.wait_exit(5)
    reason = r'error="SSL_read: unexpected eof while reading: Protocol error \(EPROTO\)"'
    cli.wait_stderr(r"multiplexed data channel lost " + reason, timeout=5)
    cli.wait_stderr(r"control channel lost " + reason, timeout=5)
