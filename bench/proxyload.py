#!/usr/bin/env python3
"""Load generator for the proxy section (run as a separate process by bench/run.py).
Loopback only; every run is bounded in connections and in time.

    proxyload.py connrate --port P --via socks5|http|none --target T [--path /x]
                          [--conns C] [--seconds S] [--max N]
        keeps C connections in flight for S seconds (or until N have finished): each
        opens a NEW connection to 127.0.0.1:P, does the proxy handshake for
        127.0.0.1:T (SOCKS5 CONNECT without authentication, or HTTP CONNECT; `none`:
        no proxy, P is a forwarder or the server itself), sends
        `GET PATH HTTP/1.1` with `Connection: close`, reads the response to EOF and
        closes. Prints one JSON line: {"ok": K, "failed": F, "seconds": S,
        "rate": K / S, "errors": {reason: count}}.

    proxyload.py firstbyte --port P --via socks5|http|none --target T [--n N] [--gap-ms G]
        N sequential new connections through the proxy to a server that writes one
        byte on accept; for each, the time from just before connect() to the arrival
        of that byte (so the handshake and the proxy's own connect are included).
        Prints {"n", "ok", "p50_us", "p99_us", "mean_us", "errors"} like probe.py.

The message builders and reply parsers are plain functions (bench/test_harness.py
tests them); the connection-rate loop is one epoll loop in one thread, like wrk -t1.
"""
import argparse
import errno
import json
import os
import select
import socket
import struct
import sys
import time

from probe import firstbyte_times

# --------------------------------------------------------------------------- messages

SOCKS5_GREETING = b"\x05\x01\x00"  # version 5, one method: no authentication


def socks5_connect_request(host, port):
    """CONNECT to an IPv4 address -> the request bytes."""
    return b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def parse_socks5_method(buf):
    """The server's method choice -> 2 (bytes used) once complete, None before.
    ValueError unless it chose "no authentication"."""
    if len(buf) < 2:
        return None
    if buf[0] != 5:
        raise ValueError(f"socks5: version {buf[0]} in the method reply")
    if buf[1] != 0:
        raise ValueError(f"socks5: method {buf[1]:#04x} chosen, not 'no authentication'")
    return 2


_ADDR_LEN = {1: 4, 4: 16}  # ATYP -> address bytes (3, a domain name, has a length byte)


def parse_socks5_reply(buf):
    """A CONNECT reply -> its length once complete, None before. ValueError for a
    reply code other than 0 (succeeded) or a malformed reply."""
    if len(buf) < 5:
        return None
    if buf[0] != 5:
        raise ValueError(f"socks5: version {buf[0]} in the reply")
    if buf[1] != 0:
        raise ValueError(f"socks5: reply code {buf[1]:#04x}")
    atyp = buf[3]
    if atyp == 3:
        n = 4 + 1 + buf[4] + 2
    elif atyp in _ADDR_LEN:
        n = 4 + _ADDR_LEN[atyp] + 2
    else:
        raise ValueError(f"socks5: address type {atyp} in the reply")
    return n if len(buf) >= n else None


def http_connect_request(host, port):
    return f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def parse_http_connect_reply(buf):
    """The proxy's answer to CONNECT -> length of its head once complete, None before.
    ValueError for a status other than 2xx."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 16384:
            raise ValueError("http: no end of head in 16 KiB")
        return None
    status = http_status(buf[:end])
    if not 200 <= status < 300:
        raise ValueError(f"http: CONNECT answered {status}")
    return end + 4


def http_status(head):
    """Status code of an HTTP/1.x response head (bytes); ValueError if there is none."""
    line = bytes(head.split(b"\r\n", 1)[0])
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"http: not a status line: {line[:60]!r}")
    return int(parts[1])


def get_request(path):
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").encode()


def handshake_steps(via, host, port):
    """[(bytes to send, parser of what comes back)] of the proxy handshake; a parser
    takes the bytes received so far and returns the length it used or None (more)."""
    if via == "socks5":
        return [(SOCKS5_GREETING, parse_socks5_method),
                (socks5_connect_request(host, port), parse_socks5_reply)]
    if via == "http":
        return [(http_connect_request(host, port), parse_http_connect_reply)]
    if via == "none":
        return []
    raise ValueError(f"unknown proxy kind {via!r}")


# --------------------------------------------------------------------------- connection rate

class _Conn:
    """One request in flight: its socket, the steps left, the bytes not yet used."""
    __slots__ = ("sock", "steps", "parse", "buf", "connected")

    def __init__(self, sock, steps):
        self.sock, self.steps, self.parse = sock, steps, None
        self.buf, self.connected = bytearray(), False


def connrate(port, via, target, path, conns, seconds, max_requests):
    steps = handshake_steps(via, "127.0.0.1", target) + [(get_request(path), None)]
    ep = select.epoll()
    live = {}
    ok = failed = started = 0
    errors = {}
    t0 = time.monotonic()
    end = t0 + seconds

    def count_failure(why):
        nonlocal failed
        failed += 1
        errors[why] = errors.get(why, 0) + 1

    def fail(c, why):
        count_failure(why)
        close(c)

    def close(c):
        fd = c.sock.fileno()
        live.pop(fd, None)
        try:
            ep.unregister(fd)
        except OSError:
            pass
        c.sock.close()

    def open_one():
        nonlocal started
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(s, list(steps))
        started += 1
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            return count_failure(f"connect: {os.strerror(err)}")
        live[s.fileno()] = c
        ep.register(s.fileno(), select.EPOLLOUT)

    def send_next(c):
        """Send the next step's bytes; wait for its answer (or the response)."""
        data, c.parse = c.steps.pop(0)
        c.sock.send(data)  # a few hundred bytes into an empty socket buffer
        ep.modify(c.sock.fileno(), select.EPOLLIN)

    def on_event(c, ev):
        nonlocal ok
        if not c.connected:
            e = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if e:
                return fail(c, f"connect: {os.strerror(e)}")
            c.connected = True
            return send_next(c)
        try:
            chunk = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            return fail(c, f"recv: {e.strerror}")
        if c.parse is None:  # the response: read to EOF
            if chunk:
                c.buf += chunk
                return
            try:
                status = http_status(c.buf)
            except ValueError as e:
                return fail(c, str(e) if c.buf else "closed before the response")
            if status != 200:
                return fail(c, f"http: {status}")
            ok += 1
            return close(c)
        if not chunk:
            return fail(c, "closed during the handshake")
        c.buf += chunk
        try:
            used = c.parse(c.buf)
        except ValueError as e:
            return fail(c, str(e))
        if used is None:
            return
        del c.buf[:used]  # a proxy may send the first response bytes right behind
        send_next(c)

    while True:
        now = time.monotonic()
        while len(live) < conns and now < end and started < max_requests:
            open_one()
        if not live:
            break
        for fd, ev in ep.poll(max(0.0, min(0.5, end + 5 - now))):
            c = live.get(fd)
            if c:
                try:
                    on_event(c, ev)
                except OSError as e:
                    fail(c, f"{type(e).__name__}: {e.strerror or e}")
        if now > end + 5:  # stragglers past the grace second count as failed
            for c in list(live.values()):
                fail(c, "unfinished at the deadline")
            break
    elapsed = time.monotonic() - t0  # the requests finished after `end` count too
    ep.close()
    return {"ok": ok, "failed": failed, "seconds": elapsed,
            "rate": ok / elapsed if elapsed > 0 else 0.0, "errors": errors}


# --------------------------------------------------------------------------- first byte

def _handshake_blocking(s, steps):
    """Run the steps on a blocking socket -> the bytes that came behind the last reply
    (the start of the payload, when the proxy sent it in the same segment)."""
    rest = b""
    for data, parse in steps:
        s.sendall(data)
        buf = bytearray()
        while True:
            chunk = s.recv(4096)
            if not chunk:
                raise OSError("closed during the handshake")
            buf += chunk
            used = parse(buf)
            if used is not None:
                rest = bytes(buf[used:])
                break
    return rest


def firstbyte(port, via, target, n, gap_ms):
    steps = handshake_steps(via, "127.0.0.1", target)

    def first_byte(s):
        early = _handshake_blocking(s, steps) if steps else b""
        return early or s.recv(1)

    return firstbyte_times(port, n, gap_ms, first_byte)


def main(argv=None):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("connrate", "firstbyte"):
        a = sub.add_parser(name)
        a.add_argument("--port", type=int, required=True)
        a.add_argument("--via", choices=("socks5", "http", "none"), required=True)
        a.add_argument("--target", type=int, required=True)
        if name == "connrate":
            a.add_argument("--path", default="/")
            a.add_argument("--conns", type=int, default=50)
            a.add_argument("--seconds", type=float, default=3.0)
            a.add_argument("--max", type=int, default=1_000_000)
        else:
            a.add_argument("--n", type=int, default=500)
            a.add_argument("--gap-ms", type=float, default=2.0)
    a = ap.parse_args(argv)
    if a.mode == "connrate":
        out = connrate(a.port, a.via, a.target, a.path, a.conns, a.seconds, a.max)
    else:
        out = firstbyte(a.port, a.via, a.target, a.n, a.gap_ms)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
