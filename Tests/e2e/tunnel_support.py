"""Helpers for the end-to-end tests of `culvert server` / `culvert client`.

Only the CLI contract is used: ready lines on stdout, log lines on stderr, exit
codes, plus the documented wire framing for the protocol tests.  Everything
runs on loopback (the netns test builds its own private topology).  Every wait
is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.dont_write_bytecode = True

from conftest import (  # noqa: E402  (read-only use of the shared helpers)
    Culvert,
    EchoServer,
    TcpServer,
    MiB,
    culvert_bin,
    parse_addr,
    recv_all,
    round_trip,
)

LISTENING_RE = re.compile(r"^listening tunnel (\S+)$")
EXPOSED_RE = re.compile(r"^exposed tcp (\S+) -> (\S+)$")

MODES = ["tls-psk", "tls-cert", "plain"]

# frame types (docs: u32 BE length of type+body, u8 type, body)
HELLO, CHALLENGE, CLIENT_AUTH, WELCOME, REFUSED = 0x01, 0x02, 0x03, 0x04, 0x05
DATA_HELLO, CONNECT, MUX = 0x21, 0x22, 0x23
PROTOCOL_VERSION = 4
MAX_FRAME = 16384


# --------------------------------------------------------------------------
# binary


def wait_for_binary(timeout: float = 180.0) -> str:
    """The culvert binary path; waits (bounded) while someone else rebuilds it."""
    path = culvert_bin()
    deadline = time.monotonic() + timeout
    while True:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        if time.monotonic() > deadline:
            pytest.fail(f"culvert binary not found or not executable: {path} (set CULVERT_BIN)", pytrace=False)
        time.sleep(0.5)


def clean_env() -> dict:
    env = dict(os.environ)
    env.pop("CULVERT_TOKEN", None)
    return env


def run_cli(args: list[str], timeout: float = 15.0, env: dict | None = None,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + 120
    while True:
        path = wait_for_binary()
        try:
            return subprocess.run(
                [*(prefix or []), path, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, timeout=timeout, text=True, errors="replace",
                env=clean_env() if env is None else env,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"culvert {args!r} did not exit within {timeout}s; stderr={exc.stderr!r}")
        except OSError as exc:  # the binary is being relinked
            if exc.errno not in (errno.ETXTBSY, errno.ENOENT) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def new_token() -> str:
    r = run_cli(["token"])
    assert r.returncode == 0 and r.stdout.strip(), f"culvert token failed: {r!r}"
    return r.stdout.strip()


# --------------------------------------------------------------------------
# processes


class TunnelProc(Culvert):
    """A running culvert server or client (optionally behind a prefix such as
    `ip netns exec NS`)."""

    def __init__(self, path: str, args: list[str], prefix: list[str] | None = None):
        # another engineer may be relinking the binary: retry briefly on ETXTBSY/ENOENT
        deadline = time.monotonic() + 120
        while True:
            try:
                if prefix:
                    super().__init__(prefix[0], [*prefix[1:], path, *args])
                else:
                    super().__init__(path, args)
                return
            except OSError as exc:
                if exc.errno not in (errno.ETXTBSY, errno.ENOENT) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                wait_for_binary()

    def listen_addrs(self, count: int = 1, timeout: float = 15.0) -> list[tuple[str, int]]:
        return [parse_addr(m.group(1)) for m in self.wait_stdout(LISTENING_RE, count, timeout)]

    def exposed(self, count: int = 1, timeout: float = 15.0) -> dict[str, tuple[str, int]]:
        """{LOCAL: (host, port)} from the `exposed tcp ADDR -> LOCAL` lines."""
        return {m.group(2): parse_addr(m.group(1)) for m in self.wait_stdout(EXPOSED_RE, count, timeout)}

    def stderr_text(self) -> str:
        with self._cond:
            return "\n".join(self.stderr_lines)

    def wait_exit_code(self, timeout: float) -> int:
        return self.wait_exit(timeout)


# --------------------------------------------------------------------------
# certificates (openssl CLI)


@dataclass
class Certs:
    dir: Path
    ca: str
    cert: str
    key: str
    other_ca: str
    fingerprint: str  # sha256:HEX of the server certificate's DER


def _openssl(*args: str, cwd: Path, input: bytes | None = None) -> bytes:
    r = subprocess.run(["openssl", *args], cwd=cwd, input=input, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)} failed: {r.stderr.decode(errors='replace')}"
    return r.stdout


def make_certs(d: Path) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
                 "-subj", f"/CN=culvert e2e {name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    os.chmod(d / "server.key", 0o600)
    der = _openssl("x509", "-in", "server.pem", "-outform", "DER", cwd=d)
    fp = "sha256:" + hashlib.sha256(der).hexdigest()
    return Certs(d, str(d / "ca.pem"), str(d / "server.pem"), str(d / "server.key"), str(d / "other-ca.pem"), fp)


# --------------------------------------------------------------------------
# the kit: token, processes, local services; everything torn down at the end


class TunnelKit:
    def __init__(self, tmp: Path, certs_factory):
        self.tmp = tmp
        self._certs_factory = certs_factory
        self.path = wait_for_binary()
        self.procs: list[TunnelProc] = []
        self.servers: list[TcpServer] = []
        self.token = new_token()
        self.token_file = self.write_token(self.token, "token")

    @property
    def certs(self) -> Certs:
        return self._certs_factory()

    def write_token(self, token: str, name: str) -> str:
        p = self.tmp / name
        p.write_text(token + "\n")
        os.chmod(p, 0o600)
        return str(p)

    def local(self, server: TcpServer) -> TcpServer:
        self.servers.append(server)
        return server

    def echo(self) -> EchoServer:
        return self.local(EchoServer())

    # -- mode-dependent flags ---------------------------------------------

    def server_mode_args(self, mode: str) -> list[str]:
        if mode == "plain":
            return ["--transport", "plain"]
        if mode == "tls-cert":
            return ["--cert", self.certs.cert, "--key", self.certs.key]
        assert mode == "tls-psk", mode
        return []

    def client_mode_args(self, mode: str) -> list[str]:
        if mode == "plain":
            return ["--transport", "plain"]
        if mode == "tls-cert":
            return ["--ca", self.certs.ca]
        return []

    @staticmethod
    def server_host(mode: str) -> str:
        return "localhost" if mode == "tls-cert" else "127.0.0.1"

    # -- processes ----------------------------------------------------------

    def spawn(self, args: list[str], prefix: list[str] | None = None) -> TunnelProc:
        p = TunnelProc(self.path, args, prefix)
        self.procs.append(p)
        return p

    def start_server(self, mode: str = "tls-psk", opts: list[str] = (), port: int = 0,
                     token_file: str | None = None, wait: bool = True) -> TunnelProc:
        args = ["server", "--listen", f"127.0.0.1:{port}", "--bind-addr", "127.0.0.1",
                "--token-file", token_file or self.token_file, *self.server_mode_args(mode), *opts]
        p = self.spawn(args)
        if wait:
            p.server_addr = p.listen_addrs(1)[0]
        return p

    def start_client(self, server: tuple[str, int] | str, services: list[str], mode: str = "tls-psk",
                     opts: list[str] = (), token_file: str | None = None, ready: bool = True,
                     mode_args: list[str] | None = None) -> TunnelProc:
        if isinstance(server, tuple):
            server = f"{self.server_host(mode)}:{server[1]}"
        args = ["client", server]
        for s in services:
            args += ["-R", s]
        args += ["--token-file", token_file or self.token_file]
        args += self.client_mode_args(mode) if mode_args is None else mode_args
        args += list(opts)
        p = self.spawn(args)
        if ready:
            p.exposed_map = p.exposed(len(services))
        return p

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for s in self.servers:
            s.close()
        for p in self.procs:
            print(p.describe(tail=40))


# --------------------------------------------------------------------------
# raw wire access


def frame(ftype: int, body: bytes = b"") -> bytes:
    return struct.pack(">IB", len(body) + 1, ftype) + body


def hello(nonce: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return frame(HELLO, struct.pack(">H", version) + nonce)


def read_exact(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    """n bytes, or None on EOF/reset; AssertionError at the deadline."""
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out reading {n} bytes (have {len(buf)})")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(buf))
        except (ConnectionResetError, ConnectionAbortedError):
            return None
        except socket.timeout:
            continue
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket, deadline: float) -> tuple[int, bytes] | None:
    """(type, body) or None when the peer closed."""
    hdr = read_exact(sock, 4, deadline)
    if hdr is None:
        return None
    (length,) = struct.unpack(">I", hdr)
    assert 1 <= length <= MAX_FRAME, f"server sent a frame announcing {length} bytes"
    data = read_exact(sock, length, deadline)
    if data is None:
        return None
    return data[0], data[1:]


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    i = 0
    while i + 5 <= len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        if length < 1 or i + 4 + length > len(data):
            break
        out.append((data[i + 4], data[i + 5:i + 4 + length]))
        i += 4 + length
    return out


def frames_until_close(sock: socket.socket, timeout: float) -> tuple[list[tuple[int, bytes]], bool]:
    """All frames the peer sends until it closes; (frames, closed)."""
    deadline = time.monotonic() + timeout
    frames = []
    try:
        while len(frames) < 1000:
            f = read_frame(sock, deadline)
            if f is None:
                return frames, True
            frames.append(f)
    except AssertionError:
        return frames, False
    return frames, False


def wait_closed_no_data(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Wait for the peer to close; returns (closed, bytes received before)."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    while time.monotonic() < deadline and len(got) < 1 << 20:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return True, bytes(got)
        except socket.timeout:
            break
        if not chunk:
            return True, bytes(got)
        got += chunk
    return False, bytes(got)


def raw_connect(addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(addr, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


# --------------------------------------------------------------------------
# a recording TCP relay (loopback) between a real client and the server


class RecordingRelay:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        # one entry per connection: {"c2s": bytearray, "s2c": bytearray}
        self.conns: list[dict] = []
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if not r:
                continue
            try:
                down, _ = self.sock.accept()
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                continue
            rec = {"c2s": bytearray(), "s2c": bytearray()}
            with self.lock:
                self.conns.append(rec)
                self._socks += [down, up]
            for src, dst, key in ((down, up, "c2s"), (up, down, "s2c")):
                t = threading.Thread(target=self._pump, args=(src, dst, rec[key]), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, sink: bytearray) -> None:
        src.settimeout(None)
        try:
            while not self._stop.is_set():
                r, _, _ = select.select([src], [], [], 0.1)
                if not r:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    sink += data
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def snapshot(self) -> list[dict]:
        with self.lock:
            return [{"c2s": bytes(c["c2s"]), "s2c": bytes(c["s2c"])} for c in self.conns]

    def close(self) -> None:
        self._stop.set()
        for s in [self.sock, *self._socks]:
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)


# --------------------------------------------------------------------------
# sockets and fds of a process


def close_wait_pids() -> dict[int, int]:
    """{pid: number of CLOSE_WAIT TCP sockets it owns}."""
    r = subprocess.run(["ss", "-tanp", "state", "close-wait"], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, timeout=10)
    out: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", r.stdout):
        out[int(pid)] = out.get(int(pid), 0) + 1
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle_fd_count(pid: int, timeout: float = 10.0, stable_for: int = 6, step: float = 0.1) -> int:
    """Poll /proc/PID/fd until the count is unchanged for `stable_for` samples."""
    deadline = time.monotonic() + timeout
    last, same = fd_count(pid), 0
    while time.monotonic() < deadline:
        time.sleep(step)
        now = fd_count(pid)
        same = same + 1 if now == last else 0
        last = now
        if same >= stable_for:
            return now
    raise AssertionError(f"fd count of pid {pid} did not settle within {timeout}s (last {last})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_refused(addr: tuple[str, int]) -> bool:
    try:
        s = socket.create_connection(addr, timeout=2)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    s.close()
    return False


def poll(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = predicate()
            if v:
                return v
        except (OSError, AssertionError) as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(step)


def run_threads(threads: list[threading.Thread], deadline: float) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"{len(alive)} thread(s) still running at the deadline: {alive[:5]}"


class CloseFirstServer(TcpServer):
    """Sends a greeting and closes at once (the local side closes first)."""

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(b"bye\n")


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------
# multiplexed data channels: what a visitor cannot see from outside


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def connections_to(port: int) -> list[tuple[int, int]]:
    """(bytes sent and acked, bytes received) of each ESTABLISHED TCP connection towards
    local port `port`, seen from its connecting end: the connections tunnel clients hold
    to a server listening there."""
    r = subprocess.run(["ss", "-tniH", "state", "established", f"( dport = :{port} )"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=10)
    assert r.returncode == 0, f"ss failed: {r.stderr}"
    out = []
    # one line with the addresses, then one indented line of TCP info per connection
    for info in re.split(r"\n(?=\S)", r.stdout.strip()):
        if not info.strip():
            continue
        acked = re.search(r"bytes_acked:(\d+)", info)
        received = re.search(r"bytes_received:(\d+)", info)
        out.append((int(acked.group(1)) if acked else 0, int(received.group(1)) if received else 0))
    return out


def echo_many(addr: tuple[str, int], payloads: list[bytes], timeout: float) -> dict[int, tuple[int, str]]:
    """Sends payloads[i] on connection i (all at once, half-closing after each) while
    reading the echo until EOF; {i: (bytes received, sha256 hex)}. Fails on any socket
    error or at the deadline."""
    errors: list[str] = []
    results: dict[int, tuple[int, str]] = {}
    lock = threading.Lock()
    socks = [socket.create_connection(addr, timeout=timeout) for _ in payloads]

    def sender(i, s):
        try:
            s.sendall(payloads[i])
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            with lock:
                errors.append(f"send {i}: {e!r}")

    def receiver(i, s):
        h = hashlib.sha256()
        total = 0
        try:
            while True:
                chunk = s.recv(256 * 1024)
                if not chunk:
                    break
                h.update(chunk)
                total += len(chunk)
        except OSError as e:
            with lock:
                errors.append(f"recv {i} after {total}: {e!r}")
        with lock:
            results[i] = (total, h.hexdigest())

    threads = []
    for i, s in enumerate(socks):
        threads.append(threading.Thread(target=sender, args=(i, s), name=f"send-{i}", daemon=True))
        threads.append(threading.Thread(target=receiver, args=(i, s), name=f"recv-{i}", daemon=True))
    try:
        run_threads(threads, time.monotonic() + timeout)
    finally:
        for s in socks:
            s.close()
    assert not errors, errors[:5]
    return results


def assert_echoed(addr: tuple[str, int], payloads: list[bytes], timeout: float) -> None:
    """echo_many, then every visitor's echo checked by length and SHA-256."""
    results = echo_many(addr, payloads, timeout=timeout)
    bad = [i for i, p in enumerate(payloads) if results.get(i) != (len(p), hashlib.sha256(p).hexdigest())]
    assert not bad, f"visitors {bad[:5]} got a wrong echo: {[results.get(i) for i in bad[:3]]}"


def local_of(server) -> str:
    """The `HOST:PORT` a client's `-R` names for a local test server (and its ready line shows)."""
    return f"127.0.0.1:{server.port}"


class UdpServer:
    """A UDP server on 127.0.0.1 answering each datagram with `answer(datagram)` (None: no
    answer), from one thread; counts what it received and from whom."""

    def __init__(self, answer):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # A single Python thread answers; a big buffer keeps bursts from overflowing it.
        self.sock.setsockopt(socket.SOL_SOCKET, 33 if os.geteuid() == 0 else socket.SO_RCVBUF, 8 << 20)  # SO_RCVBUFFORCE
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.received = 0
        self.sources: set = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(70000)
                self.received += 1
                self.sources.add(addr)
                reply = self.answer(data)
                if reply is not None:
                    self.sock.sendto(reply, addr)
            except socket.timeout:
                continue
            except OSError:
                # a reply that cannot go out (ENOBUFS in a flood) drops that datagram;
                # a closed socket ends the thread
                if self._stop.is_set():
                    return

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@contextlib.contextmanager
def open_visitors(addr: tuple[str, int], n: int, greeting: bytes):
    """n visitor connections, each checked with one round trip of `greeting % i`, kept
    open inside the block and closed after it (on every exit path)."""
    visitors: list[socket.socket] = []
    try:
        for i in range(n):
            s = socket.create_connection(addr, timeout=10)
            visitors.append(s)
            round_trip(s, greeting % i)
        yield visitors
    finally:
        for s in visitors:
            s.close()


def half_close_exchange(addr: tuple[str, int], request: bytes, response: bytes,
                        timeout: float) -> None:
    """Sends `request` to a RespondAfterEofServer behind `addr`, half-closes, and checks
    that the answer is sha256(request) followed by `response`, whole."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s, limit=8 * MiB)
    assert got[:32] == hashlib.sha256(request).digest(), "the local service saw a different request"
    assert got[32:] == response, f"answer after the half-close: {len(got) - 32} of {len(response)} bytes"


class StallServer(TcpServer):
    """Accepts and never reads (until closed), with a small receive buffer, so a
    visitor's upload backs up into the tunnel."""

    def __init__(self, host: str = "127.0.0.1"):
        super().__init__(host)
        # inherited by accepted connections
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)

    def handle(self, conn: socket.socket) -> None:
        self._stop.wait(self.handler_timeout)


class FloodServer(TcpServer):
    """Sends random bytes to each client until `limit` or until closed, counting what
    the socket took in `sent`: with a client that does not read, the count stops where
    the tunnel pushes back."""

    def __init__(self, limit: int, host: str = "127.0.0.1"):
        self.limit = limit
        self.sent = 0
        self._data = os.urandom(256 * 1024)
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        conn.settimeout(0.2)
        while self.sent < self.limit and not self._stop.is_set():
            try:
                n = conn.send(self._data)
            except socket.timeout:
                continue
            except OSError:  # the tunnel closed the connection
                return
            with self._lock:
                self.sent += n


def wait_stalled(progress, what: str, quiet: float = 0.5, timeout: float = 15.0) -> int:
    """Waits until `progress()` (a byte count) has not moved for `quiet` seconds; the
    count it stopped at."""
    last = {"n": -1, "at": time.monotonic()}

    def stalled():
        now = time.monotonic()
        n = progress()
        if n != last["n"]:
            last.update(n=n, at=now)
            return False
        return now - last["at"] >= quiet

    poll(stalled, timeout, what, step=0.05)
    return last["n"]


class StuckUpload:
    """A visitor uploading `size` random bytes from a thread, with a small send buffer
    so that it stops as soon as the tunnel pushes back."""

    def __init__(self, addr: tuple[str, int], size: int):
        self.size = size
        self.sent = 0
        self.stuck_at = -1
        self._data = os.urandom(size)
        self._stop = threading.Event()
        self.sock = socket.create_connection(addr, timeout=10)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        view = memoryview(self._data)
        while self.sent < self.size and not self._stop.is_set():
            try:
                self.sent += self.sock.send(view[self.sent:self.sent + 256 * 1024])
            except socket.timeout:
                continue
            except OSError:
                return

    def wait_stuck(self) -> int:
        """Waits until the upload stopped moving; the bytes sent by then."""
        self.stuck_at = wait_stalled(lambda: self.sent, "the upload to back up")
        return self.stuck_at

    def close(self, reset: bool = False) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# --------------------------------------------------------------------------
# recovery checks of the fault-injection suite


FD_SLACK = 6  # descriptors a settled process may hold beyond its baseline (timers, a spare channel)


def served_within(addr: tuple[str, int], limit: float, since: float, what: str) -> float:
    """Retries a verified 64 KiB echo until it succeeds; fails unless that happens within
    `limit` seconds of `since`. The seconds it took."""
    payload = os.urandom(64 * 1024)

    def works():
        assert_echoed(addr, [payload], timeout=max(0.2, since + limit - time.monotonic()))
        return True

    poll(works, limit + 0.5, what, step=0.05)
    took = time.monotonic() - since
    assert took <= limit, f"{what}: served {took:.2f}s after the fault ended (limit {limit:g}s)"
    return took


def close_wait(pid: int) -> int:
    return close_wait_pids().get(pid, 0)


def assert_settled(proc, baseline: int, what: str, slack: int = FD_SLACK) -> None:
    """The process's descriptors are back within `slack` of `baseline`, and it holds no
    CLOSE_WAIT socket (a peer's close it never noticed)."""
    def back():
        return settle_fd_count(proc.pid, timeout=5) <= baseline + slack

    poll(back, 10, f"{what}'s descriptors to return near {baseline}")
    poll(lambda: close_wait(proc.pid) == 0, 5, f"{what} to close its CLOSE_WAIT sockets")


class Transfer:
    """One visitor echoing `size` random bytes from a thread; the echo may be cut short
    by a fault, but what arrives must be the start of what was sent."""

    def __init__(self, addr: tuple[str, int], size: int):
        self.payload = os.urandom(size)
        self.got = 0
        self.corrupt = ""
        self.ended = ""  # "complete", "eof" (cut short), "reset" or "error: ..."
        self.ended_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(addr,), daemon=True)
        self._thread.start()

    def _run(self, addr: tuple[str, int]) -> None:
        try:
            with socket.create_connection(addr, timeout=10) as s:
                writer = threading.Thread(target=self._send, args=(s,), daemon=True)
                writer.start()
                while chunk := s.recv(256 * 1024):
                    if self.payload[self.got:self.got + len(chunk)] != chunk:
                        self.corrupt = f"wrong bytes at offset {self.got}"
                        return
                    self.got += len(chunk)
            self.ended = "complete" if self.got == len(self.payload) else "eof"
        except (ConnectionResetError, ConnectionAbortedError):
            self.ended = "reset"
        except OSError as e:
            self.ended = f"error: {e!r}"
        finally:
            self.ended_at = time.monotonic()

    def _send(self, s: socket.socket) -> None:
        try:
            s.sendall(self.payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def join(self, deadline: float) -> None:
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not self._thread.is_alive(), f"a cut transfer hung after {self.got} bytes"


# --------------------------------------------------------------------------
# a fault-injecting TCP relay (loopback), between a client and the server or between
# visitors and an exposed port


@dataclass
class Fault:
    """What a FaultProxy does to one connection once `after` bytes have passed in
    `direction` ("c2s": from the connecting side, "s2c": towards it): the bytes up to
    the offset are forwarded, then

    - `cut`: FIN both ways; whatever arrives afterwards is read and thrown away;
    - `reset`: RST both ways (SO_LINGER 0);
    - `drop`: nothing more is forwarded either way, the connection stays open;
    - `stall`: nothing is read either way for `seconds` (buffers fill, as in a
      partition), then `then` (`resume`, `cut` or `reset`);
    - `delay`: every later chunk, both ways, waits `seconds` before it is forwarded."""

    action: str
    direction: str = "c2s"
    after: int = 0
    seconds: float = 0.0
    then: str = "resume"

    def __post_init__(self) -> None:
        assert self.action in ("cut", "reset", "drop", "stall", "delay"), self.action
        assert self.direction in ("c2s", "s2c"), self.direction
        assert self.then in ("resume", "cut", "reset"), self.then


class FaultLink:
    """One connection through a FaultProxy: two pumps (a thread each way) and its
    state. `pass` forwards; `stalled` reads nothing until `stall_until`; `dropping`
    reads and discards; `cutting` discards until EOF or a bounded drain; `resetting`
    stops at once. The last pump to stop closes both sockets (with RST for a reset).
    Faults can be armed by byte offset (`arm`) or applied now (`apply`)."""

    # How long a cut link goes on reading (and discarding), so that its peers see a FIN
    # and nothing else: longer than any of them should take to notice it.
    DRAIN_SECONDS = 5.0

    def __init__(self, index: int, down: socket.socket, up: socket.socket, record: int):
        self.index = index
        self.down, self.up = down, up
        self.record_limit = record
        self.forwarded = {"c2s": 0, "s2c": 0}
        self.recorded = {"c2s": bytearray(), "s2c": bytearray()}
        self.faults: list[Fault] = []
        self.state = "pass"
        self.stall_until = 0.0
        self.stall_then = "resume"
        self.delay = 0.0
        self.fault_at: float | None = None  # when the fault hit
        self.fault_ended_at: float | None = None  # when a stall ended or a terminal fault hit
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._drain_until = 0.0
        self._pumps_left = 2

    def start(self) -> None:
        for src, dst, direction in ((self.down, self.up, "c2s"), (self.up, self.down, "s2c")):
            threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True,
                             name=f"fault-link-{self.index}-{direction}").start()

    def arm(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def apply(self, fault: Fault) -> None:
        """Applies `fault` now, whatever its offset."""
        with self._lock:
            self._apply_locked(fault)

    def _apply_locked(self, fault: Fault) -> None:
        now = time.monotonic()
        self.fault_at = self.fault_at or now
        if fault.action == "delay":
            self.delay = fault.seconds
            self.fault_ended_at = now
        elif fault.action == "stall":
            self.state, self.stall_until, self.stall_then = "stalled", now + fault.seconds, fault.then
        elif fault.action == "drop":
            self.state = "dropping"
            self.fault_ended_at = now
        else:
            self._terminate_locked(fault.action, now)

    def _terminate_locked(self, action: str, now: float) -> None:
        self.fault_ended_at = now
        if action == "reset":
            self.state = "resetting"
            return
        self.state, self._drain_until = "cutting", now + self.DRAIN_SECONDS
        for s in (self.down, self.up):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)

    def _due(self, direction: str, size: int) -> tuple[int, Fault | None]:
        """How many of `size` new bytes in `direction` may pass before an armed fault."""
        sent = self.forwarded[direction]
        for fault in self.faults:
            if fault.direction == direction and fault.after < sent + size:
                return max(0, fault.after - sent), fault
        return size, None

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            self._forward(src, dst, direction)
        except OSError:
            # one side reset or failed: the other side learns it the same way
            with self._lock:
                if self.state in ("pass", "stalled", "dropping"):
                    self.state = "resetting"
        finally:
            self._stopped()

    def _next_state(self) -> str:
        """The state this pump acts on now; a stall that is over resumes or ends here."""
        with self._lock:
            now = time.monotonic()
            if self.state == "stalled" and now >= self.stall_until:
                self.fault_ended_at = now
                if self.stall_then == "resume":
                    self.state = "pass"
                else:
                    self._terminate_locked(self.stall_then, now)
            if self.state == "cutting" and now >= self._drain_until:
                return "resetting"
            return self.state

    def _forward(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        while (state := self._next_state()) != "resetting":
            if state == "stalled":
                time.sleep(0.02)
                continue
            if not select.select([src], [], [], 0.05)[0]:
                continue
            chunk = src.recv(65536)
            if not chunk:
                if state == "pass":
                    dst.shutdown(socket.SHUT_WR)  # half-close passes through
                return
            with self._lock:
                if self.state != "pass":
                    continue
                n, fault = self._due(direction, len(chunk))
                delay = self.delay
            if delay:
                time.sleep(delay)
            if not self._send(dst, chunk[:n]):
                continue
            with self._lock:
                self.forwarded[direction] += n
                room = self.record_limit - len(self.recorded[direction])
                if room > 0:
                    self.recorded[direction] += chunk[:min(n, room)]
                if fault is not None:
                    self.faults.remove(fault)
                    self._apply_locked(fault)

    def _send(self, dst: socket.socket, data: bytes) -> bool:
        """Sends all of `data` unless a cut, reset or drop ends forwarding meanwhile (False
        then); never blocks for long, so a peer that stopped reading cannot pin the pump."""
        view = memoryview(data)
        while view:
            if self._next_state() in ("resetting", "cutting", "dropping"):
                return False
            if not select.select([], [dst], [], 0.05)[1]:
                continue
            try:
                view = view[dst.send(view, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                continue
        return True

    def _stopped(self) -> None:
        """The last pump out closes both sockets (with RST after a reset)."""
        with self._lock:
            self._pumps_left -= 1
            if self._pumps_left > 0:
                return
            reset = self.state == "resetting"
        for s in (self.down, self.up):
            with contextlib.suppress(OSError):
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        self.closed.set()


class FaultProxy:
    """A loopback TCP relay to `upstream` that injects Faults: `arm(index, fault)`
    before the index-th accepted connection arrives (0 is the first: a tunnel client's
    control channel, then its data channels in the order it opens them), or
    `links[i].apply(fault)` at a moment of the test's choosing. Each link records at most
    `record` bytes each way for inspection. Bounded: at most `max_links` connections,
    threads that poll with short timeouts, everything closed by `close()`."""

    def __init__(self, upstream: tuple[str, int], record: int = 0, max_links: int = 256):
        self.upstream = upstream
        self.record = record
        self.max_links = max_links
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.addr = ("127.0.0.1", self.port)
        self.links: list[FaultLink] = []
        self._armed: dict[int, list[Fault]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="fault-proxy")
        self._thread.start()

    def arm(self, index: int, fault: Fault) -> None:
        with self._lock:
            if index < len(self.links):
                self.links[index].arm(fault)
            else:
                self._armed.setdefault(index, []).append(fault)

    def link(self, index: int, timeout: float = 10.0) -> FaultLink:
        """The index-th connection, waiting for it to arrive."""
        return poll(lambda: self.links[index] if len(self.links) > index else None, timeout,
                    f"connection {index} through the fault proxy", step=0.01)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.05)[0]:
                continue
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            if len(self.links) >= self.max_links:
                down.close()
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                down.close()
                continue
            for s in (down, up):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                link = FaultLink(len(self.links), down, up, self.record)
                for fault in self._armed.pop(link.index, []):
                    link.arm(fault)
                self.links.append(link)
            link.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        with self._lock:
            links = list(self.links)
        for link in links:
            link.apply(Fault("reset"))
        for link in links:
            link.closed.wait(timeout=2)


class Slowloris:
    """Holds `per_source` connections from each source address to `server` that never
    finish a handshake: silent, or (with `first_bytes`) sending the start of one and
    then a byte every `tick`, as a slow client would. Each is reopened as soon as the
    server closes it and renewed after `renew` seconds, to stay under the handshake
    timeout. Bounded: stops at exit or after `max_seconds`."""

    def __init__(self, server: tuple[str, int], sources: list[str], per_source: int, first_bytes: bytes = b"",
                 tick: float = 0.3, renew: float = 4.0, max_seconds: float = 40.0):
        self.server, self.first_bytes = server, first_bytes
        self.slots: list[list] = [[src, None, 0.0] for src in sources for _ in range(per_source)]
        self.tick, self.renew, self.max_seconds = tick, renew, max_seconds
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)

    def __enter__(self) -> "Slowloris":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        for slot in self.slots:
            if slot[1]:
                slot[1].close()

    def _open(self, source: str) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((source, 0))
            if self.first_bytes:
                s.settimeout(1)
                s.connect(self.server)
                s.sendall(self.first_bytes)
                s.setblocking(False)
            else:
                s.setblocking(False)
                s.connect_ex(self.server)
        except OSError:
            s.close()
            return None
        self.opened += 1
        return s

    def _closed_by_server(self, s: socket.socket) -> bool:
        try:
            return s.recv(1) == b""  # an answer to a partial hello is not expected; keep it
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end:
            now = time.monotonic()
            live = [slot[1] for slot in self.slots if slot[1]]
            readable = set(select.select(live, [], [], 0)[0]) if live else set()
            for slot in self.slots:
                source, s, since = slot
                if s is not None and ((s in readable and self._closed_by_server(s)) or now - since > self.renew):
                    s.close()
                    s = None
                elif s is not None and self.first_bytes:
                    with contextlib.suppress(OSError):
                        s.send(b"\x00")
                if s is None:
                    slot[1], slot[2] = self._open(source), now
            self._stop.wait(self.tick)
