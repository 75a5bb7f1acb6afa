"""WebSocket bridges (issue 15): `culvert forward ws` (WebSocket in, TCP out) and
`culvert forward tcp LISTEN ws://…` (TCP in, WebSocket out), checked against an
independent implementation (python `websockets`) and raw sockets for what a
well-behaved library will not send."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import ssl
import threading
import time

import pytest

from conftest import MiB, EchoServer, RespondAfterEofServer, TcpServer, recv_all, run_culvert
from tunnel_support import fd_count, half_close_exchange, make_certs, poll, settle_fd_count
from ws_support import addr_of, close_code, frame, raw_upgrade, read_frames, run

websockets = pytest.importorskip("websockets")
from websockets.asyncio.client import connect as ws_connect  # noqa: E402
from websockets.asyncio.server import serve as ws_serve  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

async def ws_echo_roundtrip(url: str, data: bytes, message: int = 256 * 1024, **kw) -> bytes:
    """Sends `data` as binary messages while reading the echo; returns what came back."""
    async with ws_connect(url, max_size=None, **kw) as ws:
        async def send():
            for i in range(0, len(data), message):
                await ws.send(data[i:i + message])
        sender = asyncio.create_task(send())
        got = bytearray()
        while len(got) < len(data):
            got += await ws.recv()
        await sender
        return bytes(got)


class WSEchoServer:
    """A `websockets` server on loopback echoing binary messages, in a thread; it
    records each request's path and headers."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None):
        self.requests: list[tuple[str, dict]] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def handler(ws):
            self.requests.append((ws.request.path, dict(ws.request.headers)))
            try:
                async for msg in ws:
                    await ws.send(msg)
            except ConnectionClosed:
                pass

        async def main():
            self.server = await ws_serve(handler, "127.0.0.1", 0, max_size=None, ssl=ssl_context)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            await self.server.wait_closed()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert started.wait(10), "websockets server did not start"

    def close(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.thread.join(10)


def tcp_echo_exchange(addr: tuple[str, int], data: bytes, timeout: float = 60.0) -> bytes:
    """Sends `data` on a TCP connection while reading the echo back; returns it."""
    with socket.create_connection(addr, timeout=timeout) as s:
        got = bytearray()

        def reader():
            while len(got) < len(data):
                chunk = s.recv(256 * 1024)
                if not chunk:
                    return
                got.extend(chunk)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        s.sendall(data)
        t.join(timeout)
        return bytes(got)


# -- raw WebSocket client (for what libraries will not send) ----------------


def closed_without_data(addr: tuple[str, int]) -> bool:
    """The bridge closed a visitor to `addr` whose upgrade failed: no byte, then FIN or
    RST. The reset may come before connect() returns: the refusal can beat it back."""
    try:
        with socket.create_connection(addr, timeout=10) as s:
            return recv_all(s) == b""
    except ConnectionResetError:
        return True


def raw_http(addr: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(request)
        return recv_all(s, limit=1 * MiB)


# -- forward ws -------------------------------------------------------------


def test_forward_ws_echoes_16mib_from_a_websockets_client(bridge, servers):
    echo = EchoServer()
    servers(echo)
    b = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}", opts=["--ws-path", "/vnc"])
    assert b.ready[0][1] == f"127.0.0.1:{echo.port}"
    data = os.urandom(16 * MiB)
    got = run(ws_echo_roundtrip(f"ws://{addr_of(b)}/vnc", data))
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_forward_ws_takes_fragmented_messages_and_answers_pings(bridge, servers):
    echo = EchoServer()
    servers(echo)
    b = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}")

    async def go():
        async with ws_connect(f"ws://{addr_of(b)}/", max_size=None) as ws:
            parts = [os.urandom(1000) for _ in range(5)]
            await ws.send(iter(parts))  # one message in five frames
            pong = await ws.ping(b"are you there")
            await asyncio.wait_for(pong, 5)
            got = bytearray()
            while len(got) < 5000:
                got += await ws.recv()
            return b"".join(parts), bytes(got)

    sent, got = run(go())
    assert got == sent


def test_forward_ws_refuses_wrong_path_and_missing_upgrade(bridge, servers):
    echo = EchoServer()
    servers(echo)
    b = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}", opts=["--ws-path", "/secret"])
    addr = b.addr

    async def wrong_path():
        try:
            async with ws_connect(f"ws://{addr_of(b)}/guess"):
                pass
        except InvalidStatus as e:
            return e.response.status_code
    assert run(wrong_path()) == 404
    plain_get = raw_http(addr, b"GET /secret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert plain_get.startswith(b"HTTP/1.1 426 "), plain_get[:80]
    old_version = raw_http(addr, b"GET /secret HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")
    assert old_version.startswith(b"HTTP/1.1 426 ") and b"Sec-WebSocket-Version: 13" in old_version
    garbage = raw_http(addr, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ")
    def refusal_lines():
        return [l for l in b.stderr_text().splitlines() if "websocket upgrade refused" in l]
    poll(lambda: len(refusal_lines()) == 4, 5, "one log line per refusal")
    # Each line follows its answer, and the refusals run on two loops: the 404's line may
    # come after the next request's.
    lines = refusal_lines()
    assert any("status=404" in l and "no WebSocket endpoint at this path" in l for l in lines), lines
    assert "connection closed" not in b.stderr_text(), "no target connection for a refused upgrade"


def test_forward_ws_summarises_a_flood_of_wrong_paths(bridge, servers):
    echo = EchoServer()
    servers(echo)
    b = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}", opts=["--ws-path", "/secret"])
    for _ in range(40):
        s, head = raw_upgrade(b.addr, "/wrong")
        assert head.startswith(b"HTTP/1.1 404 ")
        s.close()
    def accounted():
        text = b.stderr_text()
        detailed = [l for l in text.splitlines() if "websocket upgrade refused" in l]
        summarised = sum(int(n) for n in re.findall(r"websocket handshakes failed.*http_404=(\d+)", text))
        return len(detailed) <= 5 and len(detailed) + summarised == 40
    poll(accounted, 5, "five refusals in full and the rest in summary lines")


def test_forward_ws_rejects_unmasked_frames_with_1002(bridge, servers):
    echo = EchoServer()
    servers(echo)
    b = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}")
    s, head = raw_upgrade(b.addr)
    assert head.startswith(b"HTTP/1.1 101 ")
    s.sendall(frame(2, b"hello", mask=None))
    frames, ended = read_frames(s, head.split(b"\r\n\r\n", 1)[1], timeout=5)
    s.close()
    assert close_code(frames) == 1002 and ended, frames
    poll(lambda: "unmasked frame" in b.stderr_text(), 5, "the close reason in the log")


def test_forward_ws_closes_an_oversize_message_with_1009(bridge, servers):
    echo = EchoServer()
    servers(echo)
    b = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}", opts=["--ws-max-message", "65536"])

    async def go():
        async with ws_connect(f"ws://{addr_of(b)}/", max_size=None) as ws:
            await ws.send(os.urandom(65536))
            assert len(await ws.recv()) > 0
            await ws.send(os.urandom(65537))
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as e:
                return e.rcvd.code if e.rcvd else None
    assert run(go()) == 1009


def test_forward_ws_drops_a_client_that_does_not_answer_pings(bridge, servers):
    echo = EchoServer()
    servers(echo)
    b = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}", opts=["--ws-ping", "300ms"])

    async def answering():
        async with ws_connect(f"ws://{addr_of(b)}/", ping_interval=None) as ws:
            await asyncio.sleep(1.5)  # the library answers the server's pings by itself
            await ws.send(b"still here")
            return await ws.recv()
    assert run(answering()) == b"still here"

    s, head = raw_upgrade(b.addr)
    start = time.monotonic()
    frames, ended = read_frames(s, head.split(b"\r\n\r\n", 1)[1], timeout=5)
    s.close()
    assert ended and time.monotonic() - start < 3, "a silent client is dropped after one unanswered ping"
    assert [op for op, _ in frames][:1] == [9], frames
    poll(lambda: "no pong within" in b.stderr_text(), 5, "the keepalive log line")


# -- forward tcp -> ws:// ---------------------------------------------------


def test_forward_tcp_to_a_websockets_server_moves_16mib_with_headers(bridge, servers):
    server = WSEchoServer()
    servers(server)
    b = bridge("tcp", "127.0.0.1:0", f"ws://127.0.0.1:{server.port}/tunnel?v=1",
               opts=["--header", "X-Token: abc", "--host-header", "edge.example"])
    assert b.ready[0][1] == f"ws://127.0.0.1:{server.port}/tunnel?v=1"
    data = os.urandom(16 * MiB)
    got = tcp_echo_exchange(b.addr, data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    path, headers = server.requests[0]
    assert path == "/tunnel?v=1" and headers.get("x-token") == "abc" and headers.get("host") == "edge.example"


def test_forward_tcp_names_the_cause_when_the_server_does_not_upgrade(bridge, servers):
    class PlainHTTP(TcpServer):
        def handle(self, conn):
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    http = PlainHTTP()
    servers(http)
    b = bridge("tcp", "127.0.0.1:0", f"ws://127.0.0.1:{http.port}/")
    assert closed_without_data(b.addr)
    poll(lambda: "websocket upgrade failed" in b.stderr_text(), 5, "the upgrade error")
    assert "the reverse proxy did not pass the WebSocket upgrade; it needs HTTP/1.1 and the Upgrade/Connection headers" in b.stderr_text()


def test_chain_through_both_bridges_keeps_bytes_half_close_and_descriptors(bridge, servers):
    echo = EchoServer()
    answer = os.urandom(3 * MiB)
    responder = RespondAfterEofServer(answer)
    servers(echo)
    servers(responder)
    ws_side = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}", opts=["--ws-path", "/a"])
    tcp_side = bridge("tcp", "127.0.0.1:0", f"ws://{addr_of(ws_side)}/a")
    baseline = {p.pid: settle_fd_count(p.pid) for p in (ws_side, tcp_side)}

    data = os.urandom(16 * MiB)
    got = tcp_echo_exchange(tcp_side.addr, data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()

    half_ws = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{responder.port}")
    half_tcp = bridge("tcp", "127.0.0.1:0", f"ws://{addr_of(half_ws)}/")
    half_close_exchange(half_tcp.addr, os.urandom(2 * MiB), answer, timeout=30)

    for p in (ws_side, tcp_side):
        poll(lambda: fd_count(p.pid) == baseline[p.pid], 10, f"descriptors of {p.args[1]} back to baseline")


def test_wss_with_a_ca_file_and_without_a_trusted_ca(bridge, servers, tmp_path):
    certs = make_certs(tmp_path / "certs")
    echo = EchoServer()
    servers(echo)
    wss = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}", opts=["--cert", certs.cert, "--key", certs.key])
    assert wss.stdout_lines[0].startswith("listening wss ")
    port = wss.addr[1]

    client_ctx = ssl.create_default_context(cafile=certs.ca)
    data = os.urandom(4 * MiB)
    got = run(ws_echo_roundtrip(f"wss://localhost:{port}/", data, ssl=client_ctx))
    assert got == data

    pinned = bridge("tcp", "127.0.0.1:0", f"wss://localhost:{port}/", opts=["--ca", certs.ca])
    got = tcp_echo_exchange(pinned.addr, data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()

    system = bridge("tcp", "127.0.0.1:0", f"wss://localhost:{port}/")
    assert closed_without_data(system.addr)
    poll(lambda: "websocket upgrade failed" in system.stderr_text(), 5, "the certificate error")
    assert "certificate" in system.stderr_text() and "--ca FILE" in system.stderr_text()


def test_websocket_options_without_a_url_target_are_usage_errors(culvert_path):
    cases = [
        (["forward", "tcp", "0", "127.0.0.1:1", "--header", "X-Token: a"], "--header applies to a ws:// or wss:// target only"),
        (["forward", "tcp", "0", "ws://127.0.0.1:1/", "127.0.0.1:2"], "must be the only target"),
        (["forward", "tcp", "0", "ws://127.0.0.1:1/", "--ca", "ca.pem"], "--ca and --sni apply to a wss:// target"),
        (["forward", "tcp", "0", "wss://h/", "--header", "Host: x"], "use --host-header"),
        (["forward", "ws", "0", "127.0.0.1:1", "--ws-path", "nope"], "--ws-path must start with /"),
        (["forward", "ws", "0", "127.0.0.1:1", "--cert", "c.pem"], "--cert and --key go together"),
    ]
    for args, message in cases:
        r = run_culvert(culvert_path, args)
        assert r.returncode == 2 and message in r.stderr, (args, r.returncode, r.stderr)
