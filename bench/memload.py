#!/usr/bin/env python3
"""Helpers for the memory measurement (run as separate processes by bench/run.py).

    memload.py sink   --port P --status FILE
        asyncio TCP sink on 127.0.0.1:P; accepts connections, reads and discards
        whatever arrives, and rewrites FILE with the number of currently open
        connections every 100 ms.

    memload.py client --port P --n N --timeout S [--batch B] [--sink-status FILE]
                      [--socks5-target T]
        opens N connections to 127.0.0.1:P in batches of B (with --socks5-target, P is
        a SOCKS5 proxy: each connection asks it for 127.0.0.1:T, no authentication,
        and counts once the proxy has answered that it is connected); with --sink-status it
        waits after each batch until the sink has seen every connection so far (so
        a forwarder's listen backlog never overflows: an overflowed handshake of a
        client that then sends nothing can stay half-open forever). Prints
        `connected K` on stdout once all N are up (or `partial K reason` at the
        deadline), then holds them idle until a line arrives on stdin (or stdin
        closes), closes them all and exits.

Both raise RLIMIT_NOFILE soft -> hard first. Traffic goes to 127.0.0.1 only.
"""
import argparse
import asyncio
import os
import resource
import sys

from proxyload import handshake_steps


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def sink(port, status_path):
    open_count = 0

    async def handle(reader, writer):
        nonlocal open_count
        open_count += 1
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            open_count -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096,
                                        reuse_address=True)
    tmp = status_path + ".tmp"
    last = None
    async with server:
        while True:
            if open_count != last:
                with open(tmp, "w") as f:
                    f.write(str(open_count))
                os.replace(tmp, status_path)
                last = open_count
            await asyncio.sleep(0.005)


def _sink_count(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


async def socks5_handshake(reader, writer, target):
    """SOCKS5 CONNECT to 127.0.0.1:target on an open connection; ValueError or
    ConnectionError when the proxy does not agree."""
    for data, parse in handshake_steps("socks5", "127.0.0.1", target):
        writer.write(data)
        buf = bytearray()
        while True:
            chunk = await reader.read(512)
            if not chunk:
                raise ConnectionError("proxy closed during the handshake")
            buf += chunk
            if parse(buf) is not None:
                break


async def client(port, n, timeout, batch, sink_status, socks5_target=None):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    writers = []
    errors = []

    async def one():
        remaining = deadline - loop.time()
        if remaining <= 0:
            errors.append("deadline")
            return
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), remaining)
            if socks5_target:
                await asyncio.wait_for(socks5_handshake(r, w, socks5_target),
                                       deadline - loop.time())
            writers.append(w)
        except (OSError, ValueError, asyncio.TimeoutError) as e:
            errors.append(type(e).__name__ + ": " + str(e))

    while len(writers) < n and not errors:
        await asyncio.gather(*(one() for _ in range(min(batch, n - len(writers)))))
        if sink_status:
            while _sink_count(sink_status) < len(writers):
                if loop.time() > deadline:
                    errors.append(f"sink saw only {_sink_count(sink_status)} of "
                                  f"{len(writers)} connections")
                    break
                await asyncio.sleep(0.005)
    if len(writers) == n:
        print(f"connected {len(writers)}", flush=True)
    else:
        reason = errors[0] if errors else "unknown"
        print(f"partial {len(writers)} {reason}", flush=True)
    # hold idle until told to close (a line on stdin, or EOF)
    await loop.run_in_executor(None, sys.stdin.readline)
    for w in writers:
        w.close()
    for w in writers:
        try:
            await asyncio.wait_for(w.wait_closed(), 2)
        except Exception:
            pass
    print("closed", flush=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--status", required=True)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--timeout", type=float, default=60)
    c.add_argument("--batch", type=int, default=100)
    c.add_argument("--sink-status")
    c.add_argument("--socks5-target", type=int)
    a = ap.parse_args()
    raise_nofile()
    if a.mode == "sink":
        asyncio.run(sink(a.port, a.status))
    else:
        asyncio.run(client(a.port, a.n, a.timeout, a.batch, a.sink_status, a.socks5_target))


if __name__ == "__main__":
    main()
