"""The bridges against python `websockets` beyond echo (issue 15's interop bullet): a
websockets server that fragments its messages, pings and ends with a close code, behind
`forward tcp … ws://`; and close codes both ways through `forward ws`."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from conftest import EchoServer
from ws_support import addr_of, run

websockets = pytest.importorskip("websockets")
from websockets.asyncio.client import connect as ws_connect  # noqa: E402
from websockets.asyncio.server import serve as ws_serve  # noqa: E402


class ScriptedServer:
    """A websockets server in a thread: per connection it sends `parts` as one
    fragmented message, pings and waits for the pong, echoes one message, and closes
    with 4001; it records the pong and the close code it got."""

    def __init__(self, parts: list[bytes]):
        self.parts = parts
        self.pong_seen = threading.Event()
        self.client_close: list[int | None] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def handler(ws):
            await ws.send(iter(self.parts))
            await asyncio.wait_for(await ws.ping(b"hi"), 5)
            self.pong_seen.set()
            await ws.send(await ws.recv())
            await ws.close(4001, "done")

        async def main():
            self.server = await ws_serve(handler, "127.0.0.1", 0, max_size=None)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            await self.server.wait_closed()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def close(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.thread.join(10)


def recv_exactly(s: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = s.recv(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


def test_forward_tcp_takes_fragments_pings_and_a_close_code_from_a_websockets_server(bridge, servers):
    parts = [os.urandom(70000) for _ in range(4)]
    server = ScriptedServer(parts)
    servers(server)
    b = bridge("tcp", "127.0.0.1:0", f"ws://127.0.0.1:{server.port}/")
    with socket.create_connection(b.addr, timeout=15) as s:
        assert recv_exactly(s, sum(map(len, parts))) == b"".join(parts), "the fragmented message, whole"
        assert server.pong_seen.wait(5), "culvert answered the server's ping"
        s.sendall(b"ping-pong")
        assert recv_exactly(s, 9) == b"ping-pong"
        s.settimeout(5)
        assert s.recv(1) == b"", "the server's close frame ends the TCP connection (FIN)"


def test_forward_ws_maps_close_codes_to_half_close_and_back(bridge, servers):
    echo = EchoServer()
    servers(echo)
    b = bridge("ws", "127.0.0.1:0", f"127.0.0.1:{echo.port}")

    async def go():
        async with ws_connect(f"ws://{addr_of(b)}/", max_size=None) as ws:
            await ws.send(b"x" * 1000)
            assert await ws.recv() == b"x" * 1000
            await ws.close(4000, "client leaves")
            return ws.close_code, ws.close_reason

    code, _ = run(go())
    # The client's close half-closes the target; the echo server then closes its side,
    # which culvert answers with a normal close.
    assert code == 1000, code
