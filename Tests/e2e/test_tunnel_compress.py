"""End-to-end tests for `culvert client --compress`: deflated data channels."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest

from conftest import Culvert, EchoServer, connect, parse_text_line, recv_all, wait_stdout_line

MiB = 1024 * 1024


@pytest.fixture
def tunnel(culvert_path, servers, tmp_path):
    procs: list[Culvert] = []
    token = tmp_path / "token"
    token.write_text("compress-test-token-0123456789\n")
    echo = servers(EchoServer())

    def start(transport: str) -> tuple[Culvert, tuple[str, int]]:
        server = Culvert(culvert_path, ["server", "--listen", "127.0.0.1:0", "--token-file", str(token), "--transport", transport])
        procs.append(server)
        port = int(wait_stdout_line(server, r"^listening tunnel 127\.0\.0\.1:(\d+)$").group(1))
        client = Culvert(culvert_path, ["client", f"127.0.0.1:{port}", "--token-file", str(token), "--transport", transport,
                                        "--compress", "-R", f"127.0.0.1:0:{echo.address}"])
        procs.append(client)
        exposed = int(wait_stdout_line(client, r"^exposed tcp 127\.0\.0\.1:(\d+) -> ").group(1))
        return server, ("127.0.0.1", exposed)

    yield start
    for p in procs:
        p.kill()


def exchange(addr, payload: bytes) -> bytes:
    s = connect(addr)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_all(s)))
    reader.start()
    s.sendall(payload)
    s.shutdown(1)
    reader.join(60)
    s.close()
    return got[0]


def closed_record(server: Culvert) -> dict:
    lines = server.wait_stderr(r"connection closed", timeout=15)
    return parse_text_line(lines[-1])


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_compressible_data_arrives_intact_and_shrinks_on_the_wire(tunnel, transport):
    server, addr = tunnel(transport)
    text = b"".join(b"line %06d: the quick brown fox jumps over the lazy dog\n" % i for i in range(80_000))
    back = exchange(addr, text)
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(text).hexdigest()
    rec = closed_record(server)
    assert int(rec["up"]) == len(text) and int(rec["down"]) == len(text)
    # Log text compresses at least 4x even at level 1.
    assert int(rec["wire_down"]) * 4 < len(text), rec
    assert int(rec["wire_up"]) * 4 < len(text), rec


def test_random_data_arrives_intact_with_compression(tunnel):
    server, addr = tunnel("plain")
    data = random.Random(11).randbytes(6 * MiB)
    back = exchange(addr, data)
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
    rec = closed_record(server)
    # Incompressible: deflate's framing costs a little, never much.
    assert len(data) <= int(rec["wire_down"]) < len(data) * 1.01


def test_interactive_bytes_are_not_held_back(tunnel):
    _, addr = tunnel("plain")
    s = connect(addr)
    try:
        for i in range(20):
            msg = b"keystroke %d\n" % i
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(100)
                assert chunk, "connection closed"
                got += chunk
            assert got == msg
    finally:
        s.close()
