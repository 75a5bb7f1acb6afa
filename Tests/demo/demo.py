#!/usr/bin/env python3
"""culvert demo: push real data through `culvert forward tcp` and through a culvert tunnel
(server + client, TLS with a token) on loopback, and verify it.

    CULVERT_BIN=.build/release/culvert python3 Tests/demo/demo.py [--connections N] ...

What it does (127.0.0.1 only, Python 3 standard library only):
  1. starts a target TCP server in this process: per connection it reads everything up
     to EOF, then answers with the SHA-256 and length of what it got (40 bytes) followed
     by a deterministic pseudo-random response, and closes;
  2. starts `culvert forward tcp 127.0.0.1:0 127.0.0.1:<target>` and waits for its ready
     line (with a deadline) to learn the port;
  3. opens N parallel connections through culvert; each uploads its own pseudo-random
     stream, half-closes, then reads the whole response;
  4. checks both directions byte for byte (upload: the server's SHA-256 against the
     client's; download: every byte against the expected stream, plus its SHA-256);
  5. sends SIGTERM, expects exit status 0 and one `connection closed ... reason=eof` log
     line per connection with the right byte counts;
  6. does the same through the intranet-penetration tunnel: `culvert server` with a fresh
     token, `culvert client -R 127.0.0.1:0:127.0.0.1:<target>` exposing the target, and
     the N connections made to the exposed port (TLS 1.3, PSK from the token);
  7. prints a short report per stage. Exit status 0 when everything matched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.dont_write_bytecode = True

MiB = 1 << 20
CHUNK = 1 * MiB
HEADER = 32 + 8  # SHA-256 of the upload + its length (big-endian u64)
OVERALL_DEADLINE = 120.0
READY_TIMEOUT = 15.0
EXIT_TIMEOUT = 15.0

READY_RE = re.compile(r"^(?:listening tcp|listening tunnel|exposed tcp) (\S+)")
CLOSED_RE = re.compile(r"^info connection closed\b")
FIELD_RE = re.compile(r"\b(up|down|reason)=(\S+)")

REPO_ROOT = Path(__file__).resolve().parents[2]


class DemoFailure(Exception):
    """Something did not match or did not happen in time; the message says what."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())


def pseudo_random(seed: bytes, size: int):
    """`size` deterministic pseudo-random bytes for `seed`, in CHUNK-sized pieces."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def upload_seed(index: int) -> bytes:
    return b"culvert-demo-upload-%d" % index


def response_seed(upload_digest: bytes) -> bytes:
    # Each connection's answer depends on what it sent, so crossed streams would show.
    return b"culvert-demo-response-" + upload_digest


# --------------------------------------------------------------------------
# the target server


class TargetServer:
    """Loopback sink: read to EOF, answer with digest + length + pseudo-random bytes."""

    def __init__(self, response_size: int, io_timeout: float) -> None:
        self.response_size = response_size
        self.io_timeout = io_timeout
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.received: list[tuple[int, bytes]] = []  # (bytes, sha256) per connection
        self.errors: list[str] = []

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="target-accept", daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # listener closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(self.io_timeout)
                digest = hashlib.sha256()
                count = 0
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                while True:
                    n = conn.recv_into(buf)
                    if n == 0:
                        break
                    digest.update(view[:n])
                    count += n
                upload_digest = digest.digest()
                with self.lock:
                    self.received.append((count, upload_digest))
                conn.sendall(upload_digest + count.to_bytes(8, "big"))
                for chunk in pseudo_random(response_seed(upload_digest), self.response_size):
                    conn.sendall(chunk)
                conn.shutdown(socket.SHUT_WR)
        except OSError as e:
            with self.lock:
                self.errors.append(f"target server: {e!r}")


# --------------------------------------------------------------------------
# the clients


@dataclass
class ClientResult:
    index: int
    sent: int = 0
    sent_digest: bytes = b""
    server_count: int = -1
    server_digest: bytes = b""
    received: int = 0
    received_digest: bytes = b""
    download_ok: bool = False
    error: str = ""

    @property
    def upload_ok(self) -> bool:
        return self.server_digest == self.sent_digest and self.server_count == self.sent


def recv_fill(sock: socket.socket, view: memoryview) -> int:
    """Fills `view` unless EOF comes first; returns the bytes read."""
    filled = 0
    while filled < len(view):
        n = sock.recv_into(view[filled:])
        if n == 0:
            break
        filled += n
    return filled


def run_client(index: int, port: int, upload_size: int, response_size: int,
               io_timeout: float, result: ClientResult) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=io_timeout) as sock:
            digest = hashlib.sha256()
            for chunk in pseudo_random(upload_seed(index), upload_size):
                sock.sendall(chunk)
                digest.update(chunk)
                result.sent += len(chunk)
            result.sent_digest = digest.digest()
            sock.shutdown(socket.SHUT_WR)  # half-close: the answer must still arrive

            header = bytearray(HEADER)
            if recv_fill(sock, memoryview(header)) != HEADER:
                raise DemoFailure("connection ended before the server's 40-byte header")
            result.server_digest = bytes(header[:32])
            result.server_count = int.from_bytes(header[32:], "big")

            # Compare every byte with the expected stream as it arrives.
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            got = hashlib.sha256()
            want = hashlib.sha256()
            mismatch_at = -1
            for expected in pseudo_random(response_seed(result.sent_digest), response_size):
                want.update(expected)
                n = recv_fill(sock, view[:len(expected)])
                got.update(view[:n])
                if mismatch_at < 0 and view[:n] != expected[:n]:
                    first = next(i for i in range(n) if buf[i] != expected[i])
                    mismatch_at = result.received + first
                result.received += n
                if n < len(expected):
                    break
            extra = recv_fill(sock, view[:1])  # anything past the expected end is wrong too
            result.received += extra
            result.received_digest = got.digest()
            result.download_ok = (result.received_digest == want.digest() and mismatch_at < 0
                                  and extra == 0 and result.received == response_size)
            if mismatch_at >= 0:
                result.error = f"download differs from the expected stream at byte {mismatch_at}"
            elif result.received != response_size:
                result.error = f"download has {result.received} bytes, expected {response_size}"
    except (OSError, DemoFailure) as e:
        result.error = f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------
# culvert


def culvert_binary() -> str:
    env = os.environ.get("CULVERT_BIN")
    candidates = [Path(env)] if env else [REPO_ROOT / ".build" / b / "culvert" for b in ("release", "debug")]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise DemoFailure(f"no executable culvert binary at {' or '.join(map(str, candidates))} "
                      "(run `make build` or set CULVERT_BIN)")


class Culvert:
    """The culvert subprocess: ready line from stdout, log lines from stderr."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.log: list[str] = []
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.log.append(raw.decode(errors="replace").rstrip("\n"))

    def wait_ready(self, timeout: float) -> str:
        """The first stdout line, within `timeout`; fails if culvert exits first."""
        deadline = Deadline(timeout)
        fd = self.proc.stdout.fileno()
        data = b""
        while b"\n" not in data:
            left = deadline.remaining()
            if left == 0:
                raise DemoFailure(f"no ready line from culvert within {timeout:.0f}s")
            readable, _, _ = select.select([fd], [], [], min(left, 0.5))
            if readable:
                piece = os.read(fd, 4096)
                if not piece:
                    self.proc.wait(timeout=5)
                    self._stderr_reader.join(timeout=2)
                    raise DemoFailure(f"culvert exited with status {self.proc.returncode} before "
                                      f"its ready line; stderr:\n" + "\n".join(self.log))
                data += piece
        return data.split(b"\n", 1)[0].decode()

    def stop(self, timeout: float) -> int:
        """SIGTERM, then the exit status (SIGKILL and a failure after `timeout`)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DemoFailure(f"culvert did not exit within {timeout:.0f}s of SIGTERM")
        self._stderr_reader.join(timeout=5)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def parse_port(ready: str) -> int:
    m = READY_RE.match(ready)
    if not m:
        raise DemoFailure(f"unexpected ready line: {ready!r}")
    return int(m.group(1).rsplit(":", 1)[1])


def transfer(port: int, n: int, upload_size: int, response_size: int, deadline: Deadline):
    """N parallel clients through `port`; their results and the elapsed time."""
    results = [ClientResult(i) for i in range(n)]
    threads = [threading.Thread(target=run_client, daemon=True,
                                args=(i, port, upload_size, response_size, deadline.remaining(), results[i]))
               for i in range(n)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline.remaining())
        if t.is_alive():
            raise DemoFailure(f"transfer not finished within the {OVERALL_DEADLINE:.0f}s deadline")
    return results, time.monotonic() - started


def report(stage: str, results, elapsed: float, server: TargetServer, received_before: int,
           log: list[str], statuses: list[int], n: int, upload_size: int, response_size: int) -> list[str]:
    """Prints one stage's report; returns what went wrong."""
    up_bytes = sum(r.sent for r in results)
    down_bytes = sum(r.received for r in results)
    server_up = sum(count for count, _ in server.received[received_before:])
    up_ok = sum(r.upload_ok for r in results)
    down_ok = sum(r.download_ok for r in results)
    total = up_bytes + down_bytes
    closed, log_problems = check_close_lines(log, n, upload_size, response_size)
    print()
    print(f"upload     client -> {stage} -> target: {fmt_bytes(up_bytes)} sent, {fmt_bytes(server_up)} received")
    print(f"           SHA-256 match (target's hash = client's): {yes_no(up_ok == n)} ({up_ok}/{n} connections)")
    print(f"download   target -> {stage} -> client: {fmt_bytes(down_bytes)} received")
    print(f"           SHA-256 match (= expected stream): {yes_no(down_ok == n)} ({down_ok}/{n} connections)")
    print(f"elapsed    {elapsed:.2f} s for {fmt_bytes(total)} both ways")
    print(f"throughput {total * 8 / elapsed / 1e9:.2f} Gbit/s, {total / MiB / elapsed:,.0f} MiB/s "
          f"(up {up_bytes / MiB / elapsed:,.0f} MiB/s, down {down_bytes / MiB / elapsed:,.0f} MiB/s)")
    print(f"culvert    {len(closed)} 'connection closed' log lines; exit status after SIGTERM: "
          + ", ".join(map(str, statuses)))
    if closed:
        print(f"           e.g. {closed[0]}")
    problems = [f"connection {r.index}: {r.error}" for r in results if r.error]
    problems += [f"connection {r.index}: upload SHA-256 differs (sent {r.sent} bytes, target got "
                 f"{r.server_count})" for r in results if not r.error and not r.upload_ok]
    problems += log_problems
    for status in statuses:
        if status != 0:
            how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            problems.append(f"culvert {how} after SIGTERM, expected exit status 0")
    return problems


# --------------------------------------------------------------------------
# report


def fmt_bytes(n: int) -> str:
    return f"{n:,} bytes ({n / MiB:,.1f} MiB)"


def yes_no(ok: bool) -> str:
    return "yes" if ok else "NO"


def check_close_lines(log: list[str], connections: int, upload_size: int,
                      response_size: int) -> tuple[list[str], list[str]]:
    """The `connection closed` lines and what is wrong with them."""
    closed = [line for line in log if CLOSED_RE.match(line)]
    problems = []
    if len(closed) != connections:
        problems.append(f"{len(closed)} 'connection closed' log lines, expected {connections}")
    for line in closed:
        fields = dict(FIELD_RE.findall(line))
        if fields.get("reason") != "eof":
            problems.append(f"close reason is not eof: {line}")
        elif fields.get("up") != str(upload_size) or fields.get("down") != str(HEADER + response_size):
            problems.append(f"close line byte counts differ from what was sent: {line}")
    return closed, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8, help="parallel connections (default 8)")
    parser.add_argument("--upload-mib", type=int, default=64, help="MiB each connection sends (default 64)")
    parser.add_argument("--download-mib", type=int, default=64, help="MiB each connection receives (default 64)")
    parser.add_argument("--no-splice", action="store_true", help="run culvert forward with --no-splice")
    args = parser.parse_args()

    deadline = Deadline(OVERALL_DEADLINE)
    upload_size = args.upload_mib * MiB
    response_size = args.download_mib * MiB
    n = args.connections

    binary = culvert_binary()
    server = TargetServer(response_size, io_timeout=OVERALL_DEADLINE)
    server.start()
    procs: list[Culvert] = []
    try:
        # Stage 1: forward tcp.
        argv = [binary, "forward", "tcp", "127.0.0.1:0", f"127.0.0.1:{server.port}"]
        if args.no_splice:
            argv.append("--no-splice")
        forward = Culvert(argv)
        procs.append(forward)
        ready = forward.wait_ready(min(READY_TIMEOUT, deadline.remaining()))
        print(f"== forward tcp\nculvert:   {' '.join(argv)}\nready:     {ready}")
        print(f"transfer:  {n} connections x {args.upload_mib} MiB up, {args.download_mib} MiB down ...", flush=True)
        results, elapsed = transfer(parse_port(ready), n, upload_size, response_size, deadline)
        status = forward.stop(min(EXIT_TIMEOUT, max(deadline.remaining(), 1.0)))
        problems = report("culvert", results, elapsed, server, 0, forward.log, [status], n, upload_size, response_size)

        # Stage 2: the tunnel (TLS with a PSK from a fresh token).
        with tempfile.TemporaryDirectory() as tmp:
            token_file = os.path.join(tmp, "token")
            token = subprocess.run([binary, "token"], capture_output=True, check=True, text=True).stdout.strip()
            with open(token_file, "w") as f:
                f.write(token + "\n")
            os.chmod(token_file, 0o600)
            tunnel_server = Culvert([binary, "server", "--listen", "127.0.0.1:0", "--token-file", token_file])
            procs.append(tunnel_server)
            server_ready = tunnel_server.wait_ready(min(READY_TIMEOUT, deadline.remaining()))
            client_argv = [binary, "client", f"127.0.0.1:{parse_port(server_ready)}", "--token-file", token_file,
                           "-R", f"127.0.0.1:0:127.0.0.1:{server.port}"]
            tunnel_client = Culvert(client_argv)
            procs.append(tunnel_client)
            exposed = tunnel_client.wait_ready(min(READY_TIMEOUT, deadline.remaining()))
            print("\n== tunnel (culvert server + culvert client, TLS 1.3 with a token)")
            print(f"server:    {server_ready}\nclient:    {' '.join(client_argv)}\nready:     {exposed}")
            print(f"transfer:  {n} connections x {args.upload_mib} MiB up, {args.download_mib} MiB down ...", flush=True)
            before = len(server.received)
            results, elapsed = transfer(parse_port(exposed), n, upload_size, response_size, deadline)
            statuses = [tunnel_client.stop(EXIT_TIMEOUT), tunnel_server.stop(EXIT_TIMEOUT)]
            problems += report("tunnel", results, elapsed, server, before, tunnel_server.log, statuses,
                               n, upload_size, response_size)

        server.close()
        print("\n(both ends are this Python script, which bounds the rate: a correctness check, not a benchmark)")
        problems += server.errors
        if problems:
            raise DemoFailure("\n  ".join(problems))
        print("\nOK: every byte arrived intact both ways, forwarded and tunneled.")
        return 0
    except DemoFailure as e:
        print(f"\nFAIL: {e}", file=sys.stderr)
        for p in procs:
            tail = p.log[-10:]
            if tail:
                print(f"{p.argv[1]} stderr (last lines):\n  " + "\n  ".join(tail), file=sys.stderr)
        return 1
    finally:
        for p in procs:
            p.kill()
        server.close()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DemoFailure as e:  # before culvert started (no binary)
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
