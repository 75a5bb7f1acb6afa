"""End-to-end tests for secret services (`culvert client --secret` / `--visit`)
and `culvert pipe` (`--via ... --service NAME`, and the plain HOST:PORT form,
including real OpenSSH using it as ProxyCommand).

Only the CLI contract is used: ready lines on stdout, log lines on stderr, exit
codes.  All traffic stays on 127.0.0.1.  Every wait is bounded by a deadline and
every process started here is killed at teardown.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.dont_write_bytecode = True

from conftest import (  # noqa: E402  (read-only use of the shared helpers)
    Culvert,
    EchoServer,
    culvert_bin,
    free_port,
    parse_addr,
)

MiB = 1024 * 1024

LISTENING_TUNNEL_RE = re.compile(r"^listening tunnel (\S+)$")
EXPOSED_SECRET_RE = re.compile(r"^exposed secret (\S+) -> (\S+)$")
EXPOSED_TCP_RE = re.compile(r"^exposed tcp (\S+) -> (\S+)$")
LISTENING_VISIT_RE = re.compile(r"^listening visit (\S+) -> (\S+)$")

TRANSPORTS = ["tls", "plain"]


# --------------------------------------------------------------------------
# binary and environment


def binary(timeout: float = 180.0) -> str:
    """Absolute path of the culvert binary; waits (bounded) while it is rebuilt."""
    path = os.path.abspath(culvert_bin())
    deadline = time.monotonic() + timeout
    while not (os.path.isfile(path) and os.access(path, os.X_OK)):
        if time.monotonic() > deadline:
            pytest.fail(f"culvert binary not found or not executable: {path} (set CULVERT_BIN)", pytrace=False)
        time.sleep(0.5)
    return path


def clean_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("CULVERT_TOKEN", None)
    env.update(extra)
    return env


# conftest.Culvert inherits our environment: make sure no stray token leaks in.
os.environ.pop("CULVERT_TOKEN", None)


def retry_exec(start, timeout: float = 120.0):
    """Call start() (which execs a program); while another engineer rebuilds the
    binary, exec can briefly fail with ENOENT or ETXTBSY: retry, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return start()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ETXTBSY) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run(args: list[str], *, input: bytes | None = None, timeout: float = 30.0,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion, bounded by `timeout`."""
    try:
        return retry_exec(lambda: subprocess.run(
            args, input=input, stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
            env=clean_env() if env is None else env))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{args!r} did not exit within {timeout}s; stderr={exc.stderr!r}")


def new_token() -> str:
    r = run([binary(), "token"])
    assert r.returncode == 0 and r.stdout.strip(), f"culvert token failed: {r!r}"
    return r.stdout.decode().strip()


def write_token(path: Path, token: str) -> str:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


# --------------------------------------------------------------------------
# processes


class Proc(Culvert):
    """A running culvert server/client (or sshd) with stdout/stderr collected."""

    stdout_timeout = 20.0

    def __init__(self, path: str, args: list[str]):
        retry_exec(lambda: Culvert.__init__(self, path, args))

    def stderr_text(self) -> str:
        with self._cond:
            return "\n".join(self.stderr_lines)


class Stack:
    """Factory for culvert servers and clients of one test; kills all at teardown."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.token = new_token()
        self.token_file = write_token(tmp / "token", self.token)

    def start(self, args: list[str]) -> Proc:
        p = Proc(binary(), args)
        self.procs.append(p)
        return p

    def server(self, transport: str = "tls", extra: list[str] = ()) -> tuple[Proc, int]:
        p = self.start(["server", "--listen", "127.0.0.1:0", "--token-file", self.token_file,
                        "--transport", transport, *extra])
        (m,) = p.wait_stdout(LISTENING_TUNNEL_RE)
        return p, parse_addr(m.group(1))[1]

    def exposer(self, port: int, secrets: list[str], transport: str = "tls",
                extra: list[str] = ()) -> Proc:
        args = ["client", f"127.0.0.1:{port}", "--token-file", self.token_file, "--transport", transport]
        for s in secrets:
            args += ["--secret", s]
        p = self.start([*args, *extra])
        p.wait_stdout(EXPOSED_SECRET_RE, count=len(secrets))
        return p

    def visitor(self, port: int, name: str, transport: str = "tls", extra: list[str] = ()) -> tuple[Proc, tuple[str, int]]:
        p = self.start(["client", f"127.0.0.1:{port}", "--token-file", self.token_file, "--transport", transport,
                        "--visit", name, "-L", "127.0.0.1:0", *extra])
        (m,) = p.wait_stdout(LISTENING_VISIT_RE)
        assert m.group(2) == name, p.describe()
        return p, parse_addr(m.group(1))

    def pipe_via(self, port: int, name: str, data: bytes, transport: str = "tls", token_file: str | None = None,
                 extra: list[str] = (), timeout: float = 60.0) -> subprocess.CompletedProcess:
        return run([binary(), "pipe", "--via", f"127.0.0.1:{port}", "--service", name,
                    "--token-file", token_file or self.token_file, "--transport", transport, *extra],
                   input=data, timeout=timeout)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            print(p.describe(tail=60))


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def stream_and_hash(addr: tuple[str, int], data: bytes, timeout: float = 60.0) -> tuple[int, str]:
    """Send `data` on a new connection while reading the echo; half-close after
    sending; return (bytes received, sha256 hex) once the peer closes."""
    s = socket.create_connection(addr, timeout=timeout)
    err: list[BaseException] = []

    def sender():
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # pragma: no cover - failure path
            err.append(exc)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    h = hashlib.sha256()
    total = 0
    try:
        while total <= len(data):
            chunk = s.recv(256 * 1024)
            if not chunk:
                break
            h.update(chunk)
            total += len(chunk)
    finally:
        t.join(timeout)
        s.close()
    if err:
        raise err[0]
    return total, h.hexdigest()


def refused_without_data(addr: tuple[str, int], timeout: float = 20.0) -> bool:
    """Connect, send a little, and expect the peer to close (EOF or reset) without
    sending anything back. The reset may come before connect() returns."""
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            s.sendall(b"must not arrive")
            data = s.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return True
    assert data == b"", f"got data from a refused visit: {data!r}"
    return True


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# 1. visit through a local -L listener


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_visit_listener_20_concurrent_1mib_echo(stack, echo, transport):
    server, port = stack.server(transport)
    stack.exposer(port, [f"db={echo.address}"], transport)
    server.wait_stderr(r"^info secret service registered .*service=db\b")
    visitor, laddr = stack.visitor(port, "db", transport)

    n = 20
    payloads = [random.Random(1000 + i).randbytes(MiB) for i in range(n)]
    results: list[tuple[int, str] | BaseException | None] = [None] * n

    def worker(i: int) -> None:
        try:
            results[i] = stream_and_hash(laddr, payloads[i])
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "connections still running after 90s"
    for i, r in enumerate(results):
        assert not isinstance(r, BaseException), f"connection {i}: {r!r}\n{visitor.describe()}"
        assert r == (MiB, sha(payloads[i])), f"connection {i}: got {r[0]} bytes, digest mismatch={r[1] != sha(payloads[i])}"
    assert echo.accepted == n
    server.wait_stderr(r"^info visitor connected .*service=db\b", count=n)


# --------------------------------------------------------------------------
# 2. visit through `culvert pipe --via`


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pipe_via_4mib_round_trip(stack, echo, transport):
    server, port = stack.server(transport)
    stack.exposer(port, [f"echo={echo.address}"], transport)
    data = random.Random(42).randbytes(4 * MiB)
    r = stack.pipe_via(port, "echo", data, transport)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert len(r.stdout) == len(data)
    assert sha(r.stdout) == sha(data)
    assert echo.accepted == 1
    server.wait_stderr(r"^info visitor connected .*service=echo\b")


# --------------------------------------------------------------------------
# 3. per-service token


def test_service_token_flag(stack, echo, tmp_path):
    a = write_token(tmp_path / "svc-a", new_token())
    b = write_token(tmp_path / "svc-b", new_token())
    server, port = stack.server()
    exposer = stack.exposer(port, [f"vault={echo.address}"], extra=["--service-token-file", a])

    # Wrong service token (B): refused before anything reaches the local service.
    r = stack.pipe_via(port, "vault", b"must not arrive", extra=["--service-token-file", b], timeout=30)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1, err
    assert "wrong service token" in err, err
    assert r.stdout == b""
    exposer.wait_stderr(r"^warning visitor refused .*service=vault\b")

    # Default service token = the shared token, which is not A either.
    r = stack.pipe_via(port, "vault", b"must not arrive", timeout=30)
    assert r.returncode == 1 and b"wrong service token" in r.stderr, r.stderr
    assert echo.accepted == 0, "the local service saw a connection from a visitor with the wrong token"

    # -L visitor with the wrong token: its connection is closed without data.
    _, laddr = stack.visitor(port, "vault", extra=["--service-token-file", b])
    assert refused_without_data(laddr)
    assert echo.accepted == 0

    # The right token (A) works, through pipe and through -L.
    data = random.Random(5).randbytes(256 * 1024)
    r = stack.pipe_via(port, "vault", data, extra=["--service-token-file", a])
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stdout == data
    assert echo.accepted == 1
    _, laddr = stack.visitor(port, "vault", extra=["--service-token-file", a])
    assert stream_and_hash(laddr, data) == (len(data), sha(data))
    assert echo.accepted == 2


def test_service_token_file_in_toml(stack, echo, tmp_path):
    a = write_token(tmp_path / "svc-a", new_token())
    b = write_token(tmp_path / "svc-b", new_token())
    server, port = stack.server()
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        f'server = "127.0.0.1:{port}"\n'
        f'token_file = "{stack.token_file}"\n'
        'transport = "tls"\n'
        "\n"
        "[services.home-ssh]\n"
        "secret = true\n"
        f'local = "{echo.address}"\n'
        f'token_file = "{a}"\n'
    )
    exposer = stack.start(["client", "-c", str(cfg)])
    (m,) = exposer.wait_stdout(EXPOSED_SECRET_RE)
    assert m.group(1) == "home-ssh" and m.group(2) == echo.address, exposer.describe()

    for wrong in (["--service-token-file", b], []):
        r = stack.pipe_via(port, "home-ssh", b"nope", extra=wrong, timeout=30)
        assert r.returncode == 1 and b"wrong service token" in r.stderr, r.stderr
    exposer.wait_stderr(r"^warning visitor refused .*service=home-ssh\b", count=2)
    assert echo.accepted == 0

    data = random.Random(6).randbytes(MiB)
    r = stack.pipe_via(port, "home-ssh", data, extra=["--service-token-file", a])
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert sha(r.stdout) == sha(data)
    assert echo.accepted == 1


# --------------------------------------------------------------------------
# 4. unknown service, wrong server token


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_service_and_wrong_server_token(stack, echo, tmp_path, transport):
    server, port = stack.server(transport)
    stack.exposer(port, [f"known={echo.address}"], transport)

    r = stack.pipe_via(port, "nope", b"x", transport, timeout=30)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1, err
    assert "no secret service named 'nope'" in err, err
    server.wait_stderr(r"^warning visit refused: unknown secret service .*service=nope\b")

    wrong = write_token(tmp_path / "wrong", new_token())
    r = stack.pipe_via(port, "known", b"x", transport, token_file=wrong, timeout=30)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1, err
    assert "authentication failed" in err, err
    assert echo.accepted == 0


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_service_name_from_a_peer_cannot_forge_log_lines(stack, echo, log_format):
    """The visitor names the service; the server logs that name. A newline must not
    start a line of its own, and no ESC may reach the terminal (issue 13, item 8)."""
    server, port = stack.server(extra=["--log-format", log_format])
    stack.exposer(port, [f"known={echo.address}"])
    # No space, quote or `=`, which once were the only reasons to quote a value; no NUL,
    # which a command line cannot carry (the unit tests cover it).
    forged = "nope\nerror:forged\x1b[31m\t\x7f\u009b"
    r = stack.pipe_via(port, forged, b"x", timeout=30)
    assert r.returncode == 1, r.stderr
    if log_format == "text":
        line = server.wait_stderr(r"^warning visit refused: unknown secret service ")[0]
        assert 'service="nope\\nerror:forged\\u001b[31m\\t\\u007f\\u009b"' in line, line
    else:
        line = server.wait_stderr(r'"msg":"visit refused: unknown secret service"')[0]
        assert json.loads(line)["service"] == forged, line
    assert not server.stderr_matching(r"^error:forged"), server.describe()
    assert not server.stderr_matching("[\x00-\x1f\x7f-\x9f]"), server.describe()
    # the pipe's own error line quotes the refusal, name included: still one line
    err = r.stderr.decode("utf-8", "replace")
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", err), repr(err)
    assert "\nerror:forged" not in err, repr(err)


# --------------------------------------------------------------------------
# 5. no public port


def listening_ports(pid: int) -> set[int]:
    r = run(["ss", "-ltnpH"], timeout=10)
    assert r.returncode == 0, r.stderr
    ports = set()
    for line in r.stdout.decode().splitlines():
        if f"pid={pid}," not in line:
            continue
        local = line.split()[3]
        ports.add(int(local.rsplit(":", 1)[1]))
    return ports


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) not installed")
def test_secret_service_opens_no_public_port(stack, echo):
    server, port = stack.server()
    before = listening_ports(server.pid)
    assert before == {port}, before

    stack.exposer(port, [f"hidden={echo.address}", f"hidden2={echo.address}"])
    server.wait_stderr(r"^info secret service registered .*service=hidden2?\b", count=2)
    # a visit must not open a port either
    r = stack.pipe_via(port, "hidden", b"ping")
    assert r.returncode == 0 and r.stdout == b"ping", r.stderr
    assert listening_ports(server.pid) == {port}

    # Control: a normal -R service does show up as a new listening port.
    pub = stack.start(["client", f"127.0.0.1:{port}", "--token-file", stack.token_file, "-R", f"0:{echo.address}"])
    (m,) = pub.wait_stdout(EXPOSED_TCP_RE)
    public_port = parse_addr(m.group(1))[1]
    assert listening_ports(server.pid) == {port, public_port}


# --------------------------------------------------------------------------
# 6. duplicate name


def test_duplicate_secret_name_refused(stack, echo):
    server, port = stack.server()
    stack.exposer(port, [f"dup={echo.address}"])
    other = EchoServer()
    try:
        second = stack.start(["client", f"127.0.0.1:{port}", "--token-file", stack.token_file,
                              "--secret", f"dup={other.address}"])
        rc = second.wait_exit(20)
        assert rc == 1, second.describe()
        assert "already registered" in second.stderr_text(), second.describe()
        # the first registration still serves visitors
        r = stack.pipe_via(port, "dup", b"still mine")
        assert r.returncode == 0 and r.stdout == b"still mine", r.stderr
        assert echo.accepted == 1 and other.accepted == 0
    finally:
        other.close()


# --------------------------------------------------------------------------
# 7. real OpenSSH with culvert pipe as ProxyCommand


def ensure_openssh() -> None:
    if os.path.exists("/usr/sbin/sshd") and shutil.which("ssh") and shutil.which("ssh-keygen"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("openssh-server/openssh-client missing and cannot be installed (not root or no apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        u = subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, env=env)
        i = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "openssh-server", "openssh-client"],
                           capture_output=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("installing openssh timed out")
    if i.returncode != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip(f"cannot install openssh: update rc={u.returncode}, install rc={i.returncode}: "
                    f"{i.stderr.decode(errors='replace')[-500:]}")


class Sshd:
    """A throwaway sshd on 127.0.0.1:<free port> with all its files in `dir`."""

    def __init__(self, dir: Path):
        if os.geteuid() != 0:
            pytest.skip("the throwaway sshd logs in as root and needs to run as root")
        dir.mkdir()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        hostkey = dir / "host_ed25519"
        self.key = dir / "client_ed25519"
        for k in (hostkey, self.key):
            r = run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], timeout=30)
            assert r.returncode == 0, r.stderr
        auth = dir / "authorized_keys"
        auth.write_text((dir / "client_ed25519.pub").read_text())
        auth.chmod(0o600)
        self.port = free_port()
        cfg = dir / "sshd_config"
        cfg.write_text(
            f"ListenAddress 127.0.0.1:{self.port}\n"
            f"HostKey {hostkey}\n"
            f"PidFile {dir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {auth}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "UseDNS no\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "LogLevel INFO\n"
        )
        self.proc = Proc("/usr/sbin/sshd", ["-D", "-e", "-f", str(cfg)])
        self.proc.wait_stderr(r"Server listening on 127\.0\.0\.1 port", timeout=15)

    def close(self) -> None:
        self.proc.kill()
        print(self.proc.describe(tail=40))


def ssh(key: Path, proxy: str, dest: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    return run(["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                "-o", f"ProxyCommand={proxy}", *dest, "echo culvert-ok; uname -s"],
               timeout=timeout)


def test_openssh_through_culvert_pipe(stack, tmp_path):
    ensure_openssh()
    sshd = Sshd(tmp_path / "sshd")
    try:
        server, port = stack.server()
        stack.exposer(port, [f"home-ssh=127.0.0.1:{sshd.port}"])
        cul = binary()

        # Through the culvert server to the secret service.  ssh runs the
        # ProxyCommand as `exec CMD`, so a bare `VAR=value cmd` prefix is not
        # possible there: `env` sets the token for the pipe.
        proxy = (f"env CULVERT_TOKEN={shlex.quote(stack.token)} {shlex.quote(cul)} "
                 f"pipe --via 127.0.0.1:{port} --service home-ssh")
        r = ssh(sshd.key, proxy, ["root@home-ssh"])
        out = r.stdout.decode(errors="replace").splitlines()
        assert r.returncode == 0, (r.returncode, r.stderr.decode(errors="replace"), sshd.proc.describe())
        assert out == ["culvert-ok", "Linux"], out
        server.wait_stderr(r"^info visitor connected .*service=home-ssh\b")

        # Plain form straight to sshd.
        r = ssh(sshd.key, f"{shlex.quote(cul)} pipe %h:%p", ["-p", str(sshd.port), "root@127.0.0.1"])
        out = r.stdout.decode(errors="replace").splitlines()
        assert r.returncode == 0, (r.returncode, r.stderr.decode(errors="replace"), sshd.proc.describe())
        assert out == ["culvert-ok", "Linux"], out
    finally:
        sshd.close()


RECORDER = """\
import signal, subprocess, sys
child = subprocess.Popen(sys.argv[3:], stderr=open(sys.argv[2], "wb"))
# ssh sends SIGHUP to its ProxyCommand when the session ends: pass it on, as if
# culvert were the ProxyCommand itself, and record how culvert ended.
signal.signal(signal.SIGHUP, lambda *_: child.send_signal(signal.SIGHUP))
rc = child.wait()
open(sys.argv[1], "w").write(str(rc))
"""


def test_pipe_as_proxycommand_ends_with_0_and_no_error(stack, tmp_path):
    """A normal ssh session through `culvert pipe` (directly and `--via` a secret
    service) ends with exit 0 and nothing on stderr: no ENOTSOCK from asking stdout,
    a pipe, for a socket error, and ssh's SIGHUP is a clean stop."""
    ensure_openssh()
    sshd = Sshd(tmp_path / "sshd")
    try:
        server, port = stack.server()
        stack.exposer(port, [f"home-ssh=127.0.0.1:{sshd.port}"])
        cul = binary()
        recorder = tmp_path / "recorder.py"
        recorder.write_text(RECORDER)
        cases = {
            "direct": ([f"{cul}", "pipe", "%h:%p"], ["-p", str(sshd.port), "root@127.0.0.1"]),
            "via": (["env", f"CULVERT_TOKEN={stack.token}", f"{cul}", "pipe", "--via", f"127.0.0.1:{port}",
                     "--service", "home-ssh"], ["root@home-ssh"]),
        }
        for name, (command, dest) in cases.items():
            for attempt in range(3):
                rc_file, err_file = tmp_path / f"{name}{attempt}.rc", tmp_path / f"{name}{attempt}.err"
                proxy = " ".join(shlex.quote(a) for a in [sys.executable, str(recorder), str(rc_file), str(err_file), *command])
                r = ssh(sshd.key, proxy, dest)
                assert r.returncode == 0, (name, r.returncode, r.stderr.decode(errors="replace"))
                assert r.stdout.decode(errors="replace").splitlines() == ["culvert-ok", "Linux"]
                deadline = time.monotonic() + 10
                while not (rc_file.exists() and rc_file.read_text() != "") and time.monotonic() < deadline:
                    time.sleep(0.05)
                err = err_file.read_text(errors="replace")
                assert rc_file.read_text() == "0", (name, attempt, rc_file.read_text(), err)
                assert err == "", (name, attempt, err)
    finally:
        sshd.close()
