"""End-to-end test helpers for `culvert forward tcp`.

Everything here follows docs/CLI-CONTRACT.md only: the ready line on stdout,
log lines on stderr, exit codes.  Network traffic goes to 127.0.0.1 / ::1 only.
Every wait is bounded by a deadline; nothing sleeps to "wait for readiness".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Do not drop __pycache__ directories into the repository.
sys.dont_write_bytecode = True

# Fixtures shared by several test files live in these support modules (their helpers are
# imported from them by name); test modules never import one another.
pytest_plugins = ["netns_support", "proxy_support", "ws_support"]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_BIN = REPO_ROOT / ".build" / "release" / "culvert"

MiB = 1024 * 1024

READY_RE = re.compile(r"^listening tcp (\S+) -> (\S+)$")
CLOSED_RE = re.compile(r"connection closed")


# --------------------------------------------------------------------------
# binary


def culvert_bin() -> str:
    env = os.environ.get("CULVERT_BIN")
    return env if env else str(DEFAULT_BIN)


@pytest.fixture(scope="session")
def culvert_path() -> str:
    path = culvert_bin()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(
            f"culvert binary not found or not executable: {path} "
            "(run `make build` or set CULVERT_BIN)",
            pytrace=False,
        )
    return path


def run_culvert(path: str, args: list[str], timeout: float = 15.0) -> subprocess.CompletedProcess:
    """Run culvert to completion (for usage errors / --help); bounded by `timeout`."""
    try:
        return subprocess.run(
            [path, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=timeout,
            text=True,
            errors="replace",
        )
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - failure path
        pytest.fail(f"culvert {args!r} did not exit within {timeout}s; stderr={exc.stderr!r}")


# --------------------------------------------------------------------------
# addresses and log parsing


def parse_addr(text: str) -> tuple[str, int]:
    """'127.0.0.1:40321' -> ('127.0.0.1', 40321); '[::1]:40321' -> ('::1', 40321)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text)
    if m:
        return m.group(1), int(m.group(2))
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"cannot parse address {text!r}")
    return host, int(port)


def fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_KV_RE = re.compile(r'([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|\S*)')
_FIRST_KV_RE = re.compile(r"(?:^|\s)[A-Za-z_][\w.-]*=")


def parse_text_line(line: str) -> dict | None:
    """Parse `LEVEL message key=value key="quoted value" ...` into a dict with
    'level', 'msg' and the key/values (values as strings, quotes removed)."""
    parts = line.split(" ", 1)
    if len(parts) < 2:
        return None
    level, rest = parts
    m = _FIRST_KV_RE.search(rest)
    msg_end = m.start() if m else len(rest)
    rec: dict = {"level": level, "msg": rest[:msg_end].strip()}
    for k, v in _KV_RE.findall(rest[msg_end:]):
        if len(v) >= 2 and v.startswith('"') and v.endswith('"'):
            v = v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        rec[k] = v
    return rec


def parse_size(value) -> int:
    return int(value)


# --------------------------------------------------------------------------
# the culvert process


class Culvert:
    """A running `culvert` process with stdout/stderr collected by threads."""

    def __init__(self, path: str, args: list[str]):
        self.args = list(args)
        self.proc = subprocess.Popen(
            [path, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._cond = threading.Condition()
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._eof = {"stdout": False, "stderr": False}
        self._readers = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout_lines, "stdout"), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr_lines, "stderr"), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.ready: list[tuple[str, str]] = []  # (listen, targets)

    def _drain(self, pipe, sink: list[str], name: str) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._cond:
                    sink.append(line)
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._eof[name] = True
                self._cond.notify_all()

    # -- waiting -----------------------------------------------------------

    def _wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {what}\n{self.describe()}"
                    )
                self._cond.wait(min(remaining, 0.1))

    #: Default bound for `wait_stdout`.
    stdout_timeout = 15.0
    #: What a ready line looks like (subclasses for other commands set their own).
    ready_re = READY_RE

    def wait_stdout(self, pattern: re.Pattern, count: int = 1, timeout: float | None = None) -> list[re.Match]:
        """The first `count` stdout lines matching `pattern`; fails if the process exits first."""
        def have():
            hits = [m for m in (pattern.match(l) for l in self.stdout_lines) if m]
            if len(hits) >= count:
                return hits
            if self.proc.poll() is not None and self._eof["stdout"] and self._eof["stderr"]:
                raise AssertionError(
                    f"process exited with {self.proc.returncode} before printing {count} line(s) "
                    f"matching {pattern.pattern!r}\n{self.describe()}")
            return None

        return self._wait_for(have, timeout or self.stdout_timeout,
                              f"{count} stdout line(s) matching {pattern.pattern!r}")

    def wait_ready(self, n: int = 1, timeout: float = 15.0) -> list[tuple[str, str]]:
        """Wait until n ready lines are on stdout; fail early if the process exits."""

        def have():
            if len(self.stdout_lines) >= n:
                return True
            if self.proc.poll() is not None and self._eof["stdout"]:
                raise AssertionError(
                    f"culvert exited with {self.proc.returncode} before printing "
                    f"{n} ready line(s)\n{self.describe()}"
                )
            return False

        self._wait_for(have, timeout, f"{n} ready line(s)")
        with self._cond:
            lines = list(self.stdout_lines[:n])
        ready = []
        for line in lines:
            m = self.ready_re.match(line)
            assert m, f"stdout line is not a ready line: {line!r}\n{self.describe()}"
            ready.append((m.group(1), m.group(2)))
        self.ready = ready
        return ready

    @property
    def addr(self) -> tuple[str, int]:
        """Bound (host, port) of the first listening socket."""
        assert self.ready, "wait_ready() first"
        return parse_addr(self.ready[0][0])

    @property
    def addrs(self) -> list[tuple[str, int]]:
        return [parse_addr(listen) for listen, _ in self.ready]

    def stderr_matching(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        with self._cond:
            return [l for l in self.stderr_lines if rx.search(l)]

    def count_stderr(self, pattern: str) -> int:
        return len(self.stderr_matching(pattern))

    def wait_stderr(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        """Wait until at least `count` stderr lines match `pattern` (regex search)."""
        rx = re.compile(pattern)

        def have():
            hits = [l for l in self.stderr_lines if rx.search(l)]
            return hits if len(hits) >= count else None

        return self._wait_for(have, timeout, f"{count} stderr line(s) matching {pattern!r}")

    def records(self) -> list[dict]:
        """stderr lines parsed as text-format log records (unparseable lines skipped)."""
        with self._cond:
            lines = list(self.stderr_lines)
        return [r for r in (parse_text_line(l) for l in lines) if r]

    def closed_records(self) -> list[dict]:
        return [r for r in self.records() if r.get("msg") == "connection closed"]

    # -- process control ----------------------------------------------------

    def running(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"culvert did not exit within {timeout}s\n{self.describe()}")
        # let the reader threads collect the last lines
        for t in self._readers:
            t.join(timeout=5)
        return rc

    def terminate(self, timeout: float = 15.0) -> int:
        self.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        for t in self._readers:
            t.join(timeout=2)
        for f in (self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except Exception:
                pass

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def describe(self, tail: int = 40) -> str:
        with self._cond:
            out = list(self.stdout_lines)
            err = list(self.stderr_lines[-tail:])
        rc = self.proc.poll()
        return (
            f"culvert {' '.join(self.args)} (pid {self.pid}, rc={rc})\n"
            f"--- stdout ---\n" + "\n".join(out) + "\n"
            f"--- stderr (last {tail}) ---\n" + "\n".join(err)
        )


@pytest.fixture
def start_culvert(culvert_path):
    """Factory: start_culvert(listen, *targets, opts=[...], ready=1) -> Culvert
    (already past its ready line(s)).  Every process is killed at teardown."""
    procs: list[Culvert] = []

    def start(listen: str, *targets: str, opts=(), ready: int = 1, timeout: float = 15.0) -> Culvert:
        c = Culvert(culvert_path, ["forward", "tcp", *opts, listen, *targets])
        procs.append(c)
        if ready:
            c.wait_ready(ready, timeout=timeout)
        return c

    yield start
    for c in procs:
        c.kill()
        print(c.describe(tail=60))


# --------------------------------------------------------------------------
# helper servers (loopback only)


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class TcpServer:
    """Threaded accept loop on host:0; one handler thread per connection."""

    handler_timeout = 60.0

    def __init__(self, host: str = "127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._local = threading.local()
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return fmt_addr(self.host, self.port)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self.sock], [], [], 0.1)
                if not r:
                    continue
                conn, _ = self.sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            conn.settimeout(self.handler_timeout)
            with self._lock:
                self.accepted += 1
                t = threading.Thread(target=self._run_handler, args=(conn, self.accepted), daemon=True)
                self._conns.append(conn)
                self._threads.append(t)
            t.start()

    def _run_handler(self, conn: socket.socket, index: int) -> None:
        self._local.index = index  # 1-based accept order, for handlers that care
        try:
            self.handle(conn)
        except (OSError, ValueError) as exc:
            if not self._stop.is_set():
                with self._lock:
                    self.errors.append(exc)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def handle(self, conn: socket.socket) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=5)
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EchoServer(TcpServer):
    """Echoes every byte; on EOF shuts down its write side, then closes."""

    def handle(self, conn: socket.socket) -> None:
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                break
            conn.sendall(view[:n])
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class RespondAfterEofServer(TcpServer):
    """Reads until EOF, then sends sha256(request) + payload, then closes."""

    def __init__(self, payload: bytes, host: str = "127.0.0.1"):
        self.payload = payload
        self.received: list[int] = []
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        h = hashlib.sha256()
        total = 0
        buf = bytearray(256 * 1024)
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                break
            h.update(memoryview(buf)[:n])
            total += n
        with self._lock:
            self.received.append(total)
        conn.sendall(h.digest())
        conn.sendall(self.payload)
        conn.shutdown(socket.SHUT_WR)


class SlowServer(TcpServer):
    """Streams `payload` to each client as soon as it connects, `chunk` bytes at
    a time with `delay` seconds between chunks, then closes.  With a client that
    does not read, the transfer stays in flight (bounded by handler_timeout)."""

    def __init__(
        self,
        payload: bytes,
        chunk: int = 64 * 1024,
        delay: float = 0.0,
        host: str = "127.0.0.1",
        serve_first: int | None = None,
    ):
        self.payload = payload
        self.chunk = chunk
        self.delay = delay
        self.serve_first = serve_first  # connections after this many: closed at once
        self.finished = 0
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        if self.serve_first is not None and self._local.index > self.serve_first:
            return
        view = memoryview(self.payload)
        for off in range(0, len(view), self.chunk):
            if self._stop.is_set():
                return
            conn.sendall(view[off : off + self.chunk])
            if self.delay:
                self._stop.wait(self.delay)
        conn.shutdown(socket.SHUT_WR)
        with self._lock:
            self.finished += 1


@pytest.fixture(scope="session")
def certs_factory(tmp_path_factory):
    """The test CA and certificates (tunnel_support.make_certs), made once per run on
    first use: tests that use no certificates never pay for them."""
    from tunnel_support import make_certs

    made = {}

    def get():
        if "c" not in made:
            made["c"] = make_certs(tmp_path_factory.mktemp("certs"))
        return made["c"]

    return get


@pytest.fixture
def kit(tmp_path, certs_factory):
    """A tunnel test kit (tunnel_support.TunnelKit)."""
    from tunnel_support import TunnelKit

    k = TunnelKit(tmp_path, certs_factory)
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def servers():
    """Factory registry: servers(EchoServer(...)) registers a server for cleanup."""
    started: list[TcpServer] = []

    def register(server: TcpServer) -> TcpServer:
        started.append(server)
        return server

    yield register
    for s in started:
        s.close()


@pytest.fixture
def echo_server(servers) -> EchoServer:
    return servers(EchoServer())


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound, then closed)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# client helpers


def connect(addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    host, port = addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_all(sock: socket.socket, limit: int = 1 << 31) -> bytes:
    buf = bytearray()
    while len(buf) <= limit:
        chunk = sock.recv(256 * 1024)
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise AssertionError(f"received more than {limit} bytes")


def round_trip(sock: socket.socket, payload: bytes) -> None:
    """Send payload on an echo connection and check the same bytes come back."""
    sock.sendall(payload)
    got = recv_exactly(sock, len(payload))
    assert got == payload, "echoed bytes differ"


def expect_closed(sock: socket.socket, timeout: float) -> str:
    """Wait until the peer closes (EOF) or resets; return 'eof' or 'reset'.
    Data arriving before that is ignored (bounded); a timeout fails."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            return "reset"
        except socket.timeout:
            break
        if not data:
            return "eof"
    raise AssertionError(f"connection not closed within {timeout}s")


def connect_expect_closed(addr: tuple[str, int], timeout: float) -> str:
    """Connect and wait for the peer to close or reset the connection.  A reset
    can already surface from connect() when the server accepts and aborts at
    once, before the client's connect completes; that counts as 'reset'."""
    try:
        s = connect(addr, timeout)
    except (ConnectionResetError, ConnectionAbortedError):
        return "reset"
    with s:
        return expect_closed(s, timeout)


def echo_once(addr: tuple[str, int], payload: bytes = b"ping", timeout: float = 10.0) -> None:
    with connect(addr, timeout) as s:
        round_trip(s, payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, 0) == b"", "unexpected data after echo"


def json_lines(lines: list[str]) -> list[dict]:
    return [json.loads(l) for l in lines]


def wait_stdout_line(proc: Culvert, pattern: str, timeout: float = 15.0) -> re.Match:
    """The first stdout line of `proc` matching `pattern`, within `timeout`."""
    return proc.wait_stdout(re.compile(pattern), timeout=timeout)[0]


@pytest.fixture
def proxy(culvert_path):
    """Starts `culvert proxy [opts] LISTEN` (default port 0); killed at the end."""
    from proxy_support import ProxyProc

    started: list[ProxyProc] = []

    def start(*opts: str, listen: str = "0") -> "ProxyProc":
        p = ProxyProc(culvert_path, [*opts, listen])
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        print(p.describe(tail=60))
