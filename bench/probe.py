#!/usr/bin/env python3
"""Small TCP helpers for the tunnel and compression measurements (run as separate
processes by bench/run.py). Loopback only.

    probe.py byte-server --port P
        accepts connections one after another; on each writes one byte and closes.

    probe.py firstbyte --port P --n N [--gap-ms G]
        N sequential NEW connections to 127.0.0.1:P; for each, the time from just before
        connect() to the arrival of the first response byte. Prints one JSON line:
        {"n": N, "ok": K, "p50_us": ..., "p99_us": ..., "mean_us": ..., "errors": [...]}.
        G ms pause between connections (lets a tunnel client refill its pool).

    probe.py source --port P --kind text|random --bytes N
        on each connection writes N bytes of deterministic content, then closes.
        text: log-like lines drawn from a fixed vocabulary (compresses ~4x with zlib -1);
        random: pseudo-random bytes (incompressible). Both are made of one 4 MiB block,
        repeated: far beyond deflate's 32 KiB window, so repetition does not help it.

    probe.py fetch --port P [--expect N]
        one connection; reads until EOF. Prints one JSON line:
        {"bytes": received, "seconds": connect-to-EOF, "gbps": ...}.
"""
import argparse
import json
import math
import random
import socket
import statistics
import sys
import time

BLOCK = 4 * 1024 * 1024

WORDS = ("GET POST PUT /api/v1/users /api/v1/orders /static/app.js /index.html 200 201 "
         "204 301 404 500 INFO WARN DEBUG ERROR request completed started user_id session "
         "latency_ms bytes upstream cache hit miss Mozilla/5.0 (X11; Linux x86_64) "
         "culvert tunnel client server connection closed opened retry backoff "
         "127.0.0.1 10.0.0.12 192.168.1.20 application/json text/html gzip").split()


def make_block(kind, size=BLOCK):
    rnd = random.Random(20240601)  # deterministic
    if kind == "random":
        return rnd.randbytes(size)
    out, n, i = [], 0, 0
    while n < size:
        line = (f"2024-06-01T12:{(i // 60) % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z "
                + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 14)))
                + f" id={rnd.randint(0, 99999)}\n")
        out.append(line)
        n += len(line)
        i += 1
    return "".join(out).encode()[:size]


def _listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(4096)
    return s


def byte_server(port):
    s = _listener(port)
    while True:
        c, _ = s.accept()
        try:
            c.sendall(b"x")
        except OSError:
            pass
        c.close()


def pct(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(p / 100.0 * len(v) - 1e-9) - 1))
    return v[k]


def firstbyte_times(port, n, gap_ms, first_byte, timeout=5.0):
    """`n` connections to 127.0.0.1:`port` one after another, `gap_ms` apart, each timed
    from connect() to what `first_byte(sock)` returns (empty: closed without a byte) ->
    the JSON summary both probes print (n, ok, errors, and the percentiles in us)."""
    times, errors = [], []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(timeout)
        try:
            t0 = time.perf_counter_ns()
            s.connect(("127.0.0.1", port))
            b = first_byte(s)
            t1 = time.perf_counter_ns()
            if b:
                times.append((t1 - t0) / 1000.0)
            else:
                errors.append("closed without a byte")
        except (OSError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            s.close()
        if len(errors) > 20:
            break
        if gap_ms:
            time.sleep(gap_ms / 1000.0)
    out = {"n": n, "ok": len(times), "errors": sorted(set(errors))[:5]}
    if times:
        out.update(p50_us=statistics.median(times), p99_us=pct(times, 99),
                   mean_us=statistics.fmean(times))
    return out


def firstbyte(port, n, gap_ms):
    print(json.dumps(firstbyte_times(port, n, gap_ms, lambda s: s.recv(1))), flush=True)


def source(port, kind, nbytes):
    block = memoryview(make_block(kind))
    s = _listener(port)
    while True:
        c, _ = s.accept()
        try:
            left = nbytes
            while left > 0:
                k = min(left, len(block))
                c.sendall(block[:k])
                left -= k
            c.shutdown(socket.SHUT_WR)
            c.settimeout(10)
            while c.recv(65536):  # wait for the peer's close: no RST, nothing lost
                pass
        except OSError:
            pass
        c.close()


def fetch(port, timeout=120.0):
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    s = socket.socket()
    s.settimeout(timeout)
    total = 0
    t0 = time.perf_counter()
    try:
        s.connect(("127.0.0.1", port))
        while True:
            k = s.recv_into(mv)
            if not k:
                break
            total += k
    except OSError as e:
        print(json.dumps({"bytes": total, "error": f"{type(e).__name__}: {e}"}), flush=True)
        return
    finally:
        s.close()
    dt = time.perf_counter() - t0
    print(json.dumps({"bytes": total, "seconds": dt, "gbps": total * 8 / dt / 1e9}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("byte-server")
    a.add_argument("--port", type=int, required=True)
    a = sub.add_parser("firstbyte")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--n", type=int, default=500)
    a.add_argument("--gap-ms", type=float, default=2.0)
    a = sub.add_parser("source")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--kind", choices=("text", "random"), required=True)
    a.add_argument("--bytes", type=int, required=True)
    a = sub.add_parser("fetch")
    a.add_argument("--port", type=int, required=True)
    a = ap.parse_args(argv)
    if a.mode == "byte-server":
        byte_server(a.port)
    elif a.mode == "firstbyte":
        firstbyte(a.port, a.n, a.gap_ms)
    elif a.mode == "source":
        source(a.port, a.kind, a.bytes)
    else:
        fetch(a.port)


if __name__ == "__main__":
    sys.exit(main())
