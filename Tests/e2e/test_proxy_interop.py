"""Interop of `culvert proxy` with dante-server as the reference SOCKS5 server: the same
requests sent to both get the same reply codes. Skipped with the reason when danted is
not installed or cannot start here.

Loopback only; every wait is bounded (ready lines, socket timeouts, polls)."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess

import pytest

from conftest import Culvert, parse_addr
from proxy_support import READY_RE
from tunnel_support import free_port, poll


def socks_reply(address: tuple[str, int], request: bytes) -> bytes:
    """The reply code of one SOCKS5 request without authentication (b"" when closed)."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(request)
        head = b""
        while len(head) < 2:
            try:
                chunk = s.recv(2 - len(head))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return b""
            head += chunk
        return head[1:2]


def v4(host: str, port: int, cmd: int = 1) -> bytes:
    return bytes([5, cmd, 0, 1]) + socket.inet_aton(host) + struct.pack(">H", port)


def name(text: bytes, port: int) -> bytes:
    return bytes([5, 1, 0, 3, len(text)]) + text + struct.pack(">H", port)


@pytest.fixture
def danted(tmp_path):
    if shutil.which("danted") is None:
        pytest.skip("danted not installed (apt dante-server; make deps)")
    port, denied = free_port(), free_port()
    conf = tmp_path / "danted.conf"
    conf.write_text(
        "logoutput: stderr\n"
        f"internal: 127.0.0.1 port = {port}\n"
        "external: 127.0.0.1\n"
        "socksmethod: none\nclientmethod: none\n"
        "user.privileged: root\nuser.unprivileged: nobody\n"
        "client pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n"
        f"socks block {{ from: 0.0.0.0/0 to: 127.0.0.1/32 port = {denied} }}\n"
        "socks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect udpassociate }\n"
    )
    proc = subprocess.Popen(["danted", "-f", str(conf), "-N", "1", "-p", str(tmp_path / "danted.pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def accepting() -> bool:
        if proc.poll() is not None:
            return True
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    poll(accepting, 10, "danted accepting")
    if proc.poll() is not None:
        pytest.skip(f"danted cannot start here: {proc.stderr.read().decode(errors='replace')[-300:]}")
    yield ("127.0.0.1", port), denied
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_reply_codes_agree_with_dante(danted, culvert_path):
    dante, denied = danted
    proxy = Culvert(culvert_path, ["proxy", "--deny", f"127.0.0.1:{denied}", "0"])
    try:
        culvert = parse_addr(proxy.wait_stdout(READY_RE)[0].group(1))
        closed = free_port()
        requests = {
            "connection refused": v4("127.0.0.1", closed),
            "not allowed by the rules": v4("127.0.0.1", denied),
            "port 0": v4("127.0.0.1", 0),
            "invalid host name": name(b"bad name!", 80),
            "unknown host": name(b"no-such-host.invalid", 80),
            "UDP ASSOCIATE with DST 0.0.0.0:0": v4("0.0.0.0", 0, cmd=3),
        }
        for what, request in requests.items():
            ours, theirs = socks_reply(culvert, request), socks_reply(dante, request)
            assert ours == theirs, f"{what}: culvert {ours.hex()} vs dante {theirs.hex()}"
        # Where dante closes without a reply, culvert answers with the RFC's code.
        assert socks_reply(dante, v4("127.0.0.1", 80, cmd=9)) == b""
        assert socks_reply(culvert, v4("127.0.0.1", 80, cmd=9)) == b"\x07"
        assert socks_reply(dante, bytes([5, 1, 0, 9, 1, 2, 3, 4, 0, 80])) == b""
        assert socks_reply(culvert, bytes([5, 1, 0, 9, 1, 2, 3, 4, 0, 80])) == b"\x08"
    finally:
        proxy.kill()
        print(proxy.describe(tail=40))
