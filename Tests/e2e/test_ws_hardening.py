"""Issue 15's hardening checks end to end: the outer TLS of wss is TLS 1.3 only (on the
tunnel server and on `forward ws`), a client behind an nginx that drops the upgrade
retries with a growing backoff, and bad input (garbage before the upgrade, an oversized
head, a 2^63 length, reserved bits, a text frame) closes that connection with the right
status or close code and exactly one log line, on `forward ws` and on the tunnel server."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest

from conftest import EchoServer
from tunnel_support import make_certs, poll
from ws_support import close_code, frame, raw_upgrade, read_frames, ws_client, ws_server

MASK = b"\x01\x02\x03\x04"


def s_client(port: int, version: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "s_client", version, "-connect", f"127.0.0.1:{port}", "-servername", "localhost"],
                          input=b"", capture_output=True, timeout=15)


def assert_tls13_only(port: int) -> None:
    old = s_client(port, "-tls1_2")
    assert old.returncode != 0, old.stdout.decode(errors="replace")
    assert b"protocol version" in old.stderr + old.stdout, old.stderr.decode(errors="replace")
    new = s_client(port, "-tls1_3")
    assert b"TLSv1.3" in new.stdout, new.stdout.decode(errors="replace")


def test_wss_tunnel_server_refuses_tls_1_2(kit):
    _, port = ws_server(kit, "wss")
    assert_tls13_only(port)


def test_forward_wss_refuses_tls_1_2(bridge, servers, tmp_path):
    certs = make_certs(tmp_path / "certs")
    echo = EchoServer()
    servers(echo)
    b = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}", opts=["--cert", certs.cert, "--key", certs.key])
    assert_tls13_only(b.addr[1])


def test_a_client_behind_nginx_without_upgrade_backs_off(kit, nginx):
    _, port = ws_server(kit, "ws")
    front = nginx(port, upgrade=False)
    client = ws_client(kit, f"wss://localhost:{front.port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                       opts=["--ca", kit.certs.ca, "--reconnect-max", "4s"], ready=False)
    delay_re = re.compile(r"reconnecting .*delay=([0-9.]+)(ms|s)\b")

    def delays():
        found = [float(v) / (1000 if unit == "ms" else 1) for v, unit in delay_re.findall(client.stderr_text())]
        return found if len(found) >= 4 else None

    waits = poll(delays, 20, "four reconnect delays")
    assert waits[3] > waits[0] * 2, f"the backoff grows: {waits}"
    assert client.stderr_text().count("the reverse proxy did not pass the WebSocket upgrade") >= 4
    assert client.proc.poll() is None, "the client keeps retrying"


# -- bad input --------------------------------------------------------------

BAD_FRAMES = [
    ("a 2^63 length", b"\x82\xff\x80\x00\x00\x00\x00\x00\x00\x00" + MASK, 1002, "frame length has its top bit set"),
    ("reserved bits", bytes([0x82 | 0x40, 0x80 | 2]) + MASK + b"\x00\x00", 1002, "reserved bits set"),
    ("a text frame", frame(1, b"hello", mask=MASK), 1003, "text frame where binary is carried"),
]

BAD_HEADS = [
    ("garbage before the upgrade", b"\x00\x17junk\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 400 "),
    ("an oversized head", b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n", b"HTTP/1.1 431 "),
]


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def check_bad_frames(addr: tuple[str, int], path: str, log) -> None:
    for what, data, code, reason in BAD_FRAMES:
        s, head = raw_upgrade(addr, path)
        assert head.startswith(b"HTTP/1.1 101 "), (what, head)
        s.sendall(data)
        frames, ended = read_frames(s, head.split(b"\r\n\r\n", 1)[1], timeout=5)
        s.close()
        assert close_code(frames) == code and ended, (what, frames)
        poll(lambda: lines_with(log(), reason), 5, f"the log line for {what}")
        assert len(lines_with(log(), reason)) == 1, (what, lines_with(log(), reason))


def check_bad_heads(addr: tuple[str, int], log, line: str) -> None:
    before = len(lines_with(log(), line))
    for n, (what, request, status) in enumerate(BAD_HEADS, start=before + 1):
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(request)
            answer = s.recv(4096)
        assert answer.startswith(status), (what, answer[:80])
        poll(lambda: len(lines_with(log(), line)) >= n, 5, f"the log line for {what}")
        assert len(lines_with(log(), line)) == n, (what, lines_with(log(), line))


def test_forward_ws_closes_bad_input_with_its_code_and_one_line(bridge, servers):
    echo = EchoServer()
    servers(echo)
    b = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}")
    check_bad_frames(b.addr, "/", b.stderr_text)
    check_bad_heads(b.addr, b.stderr_text, "websocket upgrade refused")


@pytest.mark.parametrize("inner", ["tls", "plain"])
def test_tunnel_server_closes_bad_input_with_its_code_and_one_line(kit, inner):
    host, port = ws_server(kit, "ws", opts=["--inner", inner])
    server = kit.procs[0]
    check_bad_frames((host, port), "/tunnel", server.stderr_text)
    check_bad_heads((host, port), server.stderr_text, "handshake failed")
