"""End-to-end tests for `culvert pipe HOST:PORT` (stdin/stdout to a TCP port)."""

from __future__ import annotations

import hashlib
import random
import socket
import subprocess
import threading
import time

from conftest import EchoServer, RespondAfterEofServer, free_port


def pipe(culvert_path: str, target: str, data: bytes, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([culvert_path, "pipe", target], input=data, capture_output=True, timeout=timeout)


def test_pipe_round_trips_stdin_through_echo_and_exits_0(culvert_path, servers):
    echo = servers(EchoServer())
    data = random.Random(7).randbytes(8 << 20)
    r = pipe(culvert_path, echo.address, data)
    assert r.returncode == 0, r.stderr.decode()
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    assert len(r.stdout) == len(data)


def test_pipe_stdin_eof_half_closes_and_whole_response_arrives(culvert_path, servers):
    payload = random.Random(3).randbytes(2 << 20)
    server = servers(RespondAfterEofServer(payload))
    request = b"request bytes " * 1000
    r = pipe(culvert_path, server.address, request)
    assert r.returncode == 0, r.stderr.decode()
    # The server answers only after it saw EOF, which only stdin's EOF can cause.
    assert r.stdout == hashlib.sha256(request).digest() + payload
    assert server.received == [len(request)]


def test_remote_close_ends_pipe_while_stdin_stays_open(culvert_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        conn.sendall(b"banner\n")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    proc = subprocess.Popen([culvert_path, "pipe", f"127.0.0.1:{port}"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert proc.returncode == 0, "pipe should exit 0 when the remote closes, stdin still open"
        assert proc.stdout.read() == b"banner\n"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
        proc.wait(timeout=5)
        listener.close()


def test_pipe_to_closed_port_exits_1_with_reason(culvert_path):
    port = free_port()
    r = pipe(culvert_path, f"127.0.0.1:{port}", b"x", timeout=15)
    assert r.returncode == 1
    assert b"cannot connect" in r.stderr and b"ECONNREFUSED" in r.stderr


def test_pipe_bad_address_exits_2(culvert_path):
    r = pipe(culvert_path, "no-port-here", b"")
    assert r.returncode == 2
    assert b"no-port-here" in r.stderr
