"""The WebSocket settings in config files (issue 15): server ws_path, inner, ws_ping;
client server = "ws://…", headers, host_header, sni, inner, ws_ping, proxy. A reload
that changes one reports it as needing a restart; WebSocket keys without a WebSocket
transport are a usage error."""

from __future__ import annotations

import signal
import socket

from conftest import round_trip


def test_websocket_keys_in_both_files_and_their_reload_needs_a_restart(kit, tmp_path):
    echo = kit.echo()
    scfg = tmp_path / "server.toml"
    base = f'listen = "127.0.0.1:0"\ntoken_file = "{kit.token_file}"\nbind_addr = "127.0.0.1"\ntransport = "ws"\ninner = "plain"\nws_ping = "1s"\n'
    scfg.write_text(base + 'ws_path = "/t"\n')
    server = kit.spawn(["server", "-c", str(scfg)])
    _, port = server.listen_addrs(1)[0]
    ccfg = tmp_path / "client.toml"
    cbase = (f'server = "ws://127.0.0.1:{port}/t"\ntoken_file = "{kit.token_file}"\ninner = "plain"\n'
             'headers = ["X-Tunnel: yes"]\nhost_header = "tunnel.example"\n')
    services = f'[services.echo]\nremote_port = 0\nlocal = "127.0.0.1:{echo.port}"\n'
    ccfg.write_text(cbase + 'ws_ping = "off"\n' + services)
    client = kit.spawn(["client", "-c", str(ccfg)])
    (addr,) = client.exposed(1).values()
    with socket.create_connection(addr, timeout=10) as s:
        round_trip(s, b"through a ws tunnel set up by config files")

    scfg.write_text(base + 'ws_path = "/u"\n')
    server.proc.send_signal(signal.SIGHUP)
    server.wait_stderr(r"needs a restart.*ws_path", timeout=15)
    ccfg.write_text(cbase + 'ws_ping = "5s"\n' + services)
    client.proc.send_signal(signal.SIGHUP)
    client.wait_stderr(r"needs a restart.*ws_ping", timeout=15)
    with socket.create_connection(addr, timeout=10) as s:
        round_trip(s, b"still up")


def test_websocket_keys_need_a_websocket_transport(kit, tmp_path):
    scfg = tmp_path / "server.toml"
    scfg.write_text(f'listen = "127.0.0.1:0"\ntoken_file = "{kit.token_file}"\nws_path = "/t"\n')
    server = kit.spawn(["server", "-c", str(scfg)])
    assert server.wait_exit(5) == 2, server.describe()
    assert "ws_path, inner and ws_ping need transport ws or wss" in server.stderr_text(), server.describe()
