"""A client with several servers (issue 16, "Several servers"): `culvert client A,B`.

Two servers share the token and listen on 127.0.0.1 on ports of their own; server A
exposes services on 127.0.0.2 and server B on 127.0.0.3 (`--bind-addr`), as two hosts
would, so that both can hold the same remote port and the `exposed` line names the
server that holds it. The client prefers A, moves to B when A is lost, and moves back
to A when it answers again (`--failback-interval 1s`). Every transfer is checked by
SHA-256; every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import urllib.request

import pytest

from conftest import parse_addr, run_culvert
from tunnel_support import assert_echoed, free_port, poll, served_within

HEARTBEAT = ["--heartbeat-interval", "500ms", "--heartbeat-misses", "2"]
CLIENT_OPTS = [*HEARTBEAT, "--reconnect-max", "1s", "--failback-interval", "1s"]
BIND = {"A": "127.0.0.2", "B": "127.0.0.3"}
EXPOSED_RE = re.compile(r"^exposed tcp (\S+) -> (\S+)$")
ADMIN_RE = re.compile(r"^listening admin (\S+)$")
MOVE_LIMIT = 5.0  # seconds from a server's loss (or return) to the exposed line naming the next


class Servers:
    """Servers A and B on fixed tunnel ports, killed (SIGKILL) and started again there."""

    def __init__(self, kit):
        self.kit = kit
        self.ports = {"A": free_port(), "B": free_port()}
        self.procs: dict[str, object] = {}

    def start(self, name: str):
        p = self.kit.spawn(["server", "--listen", f"127.0.0.1:{self.ports[name]}", "--bind-addr", BIND[name],
                            "--token-file", self.kit.token_file, *HEARTBEAT])
        p.listen_addrs(1)
        self.procs[name] = p
        return p

    def kill(self, name: str) -> None:
        self.procs.pop(name).kill()

    def alive(self, name: str) -> bool:
        return name in self.procs

    @property
    def client_arg(self) -> str:
        return f"127.0.0.1:{self.ports['A']},127.0.0.1:{self.ports['B']}"


class Holder:
    """Follows the client's `exposed` lines: which server holds the service, and since
    when the test knows it (the time it saw the line)."""

    def __init__(self, client):
        self.client = client
        self.seen = 0
        self.moves: list[tuple[float, str, tuple[str, int]]] = []  # (seen at, server, address)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            with self.client._cond:
                lines = list(self.client.stdout_lines[self.seen:])
            now = time.monotonic()
            for line in lines:
                self.seen += 1
                m = EXPOSED_RE.match(line)
                if m:
                    addr = parse_addr(m.group(1))
                    server = next(n for n, b in BIND.items() if b == addr[0])
                    with self._lock:
                        self.moves.append((now, server, addr))
            time.sleep(0.005)

    def current(self) -> tuple[float, str, tuple[str, int]] | None:
        with self._lock:
            return self.moves[-1] if self.moves else None

    def wait(self, server: str, after: int, timeout: float = MOVE_LIMIT) -> tuple[str, int]:
        """The address of the first exposed line after the first `after` naming `server`."""
        def named():
            with self._lock:
                return next((a for _, s, a in self.moves[after:] if s == server), None)
        return poll(named, timeout, f"an exposed line naming server {server}", step=0.02)

    def count(self) -> int:
        with self._lock:
            return len(self.moves)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class PacedTransfer:
    """One visitor sending `size` random bytes in 64 KiB pieces every `pause` seconds and
    reading the echo: a transfer that lasts long enough to span a move."""

    def __init__(self, addr: tuple[str, int], size: int, pause: float):
        self.payload = os.urandom(size)
        self.received = hashlib.sha256()
        self.got = 0
        self.error = ""
        self.ended_at = 0.0
        self._pause = pause
        self._thread = threading.Thread(target=self._run, args=(addr,), daemon=True)
        self._thread.start()

    def _run(self, addr) -> None:
        try:
            with socket.create_connection(addr, timeout=20) as s:
                writer = threading.Thread(target=self._send, args=(s,), daemon=True)
                writer.start()
                while chunk := s.recv(256 * 1024):
                    self.received.update(chunk)
                    self.got += len(chunk)
                writer.join(timeout=20)
        except OSError as e:
            self.error = repr(e)
        self.ended_at = time.monotonic()

    def _send(self, s: socket.socket) -> None:
        for i in range(0, len(self.payload), 64 * 1024):
            s.sendall(self.payload[i:i + 64 * 1024])
            time.sleep(self._pause)
        s.shutdown(socket.SHUT_WR)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)
        assert not self._thread.is_alive(), f"the transfer hung after {self.got} bytes"

    def intact(self) -> bool:
        return not self.error and self.got == len(self.payload) \
            and self.received.hexdigest() == hashlib.sha256(self.payload).hexdigest()


def status(client) -> dict:
    host, port = parse_addr(client.wait_stdout(ADMIN_RE)[0].group(1))
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("mux", ["1", "0"], ids=["mux", "dedicated"])
def test_client_moves_to_the_next_server_and_back_without_dropping_a_transfer(kit, mux):
    servers = Servers(kit)
    servers.start("A")
    servers.start("B")
    echo = kit.echo()
    remote = free_port()
    client = kit.spawn(["client", servers.client_arg, "-R", f"{remote}:127.0.0.1:{echo.port}",
                        "--token-file", kit.token_file, "--mux", mux, "--admin", "127.0.0.1:0", *CLIENT_OPTS])
    holder = Holder(client)
    try:
        at_a = holder.wait("A", 0)
        assert at_a == (BIND["A"], remote)
        assert_echoed(at_a, [os.urandom(1 << 20)], timeout=10)
        assert status(client)["server"] == f"127.0.0.1:{servers.ports['A']}"

        # A is lost: the client registers the service on B and says so.
        lost = time.monotonic()
        servers.kill("A")
        at_b = holder.wait("B", 1)
        assert at_b == (BIND["B"], remote)
        served_within(at_b, MOVE_LIMIT, lost, "a visitor through server B after A was lost")
        client.wait_stderr(rf"services held by server .*server=127\.0\.0\.1:{servers.ports['B']}")
        assert status(client)["server"] == f"127.0.0.1:{servers.ports['B']}"

        # A returns while a transfer runs through B: the client moves back to A, and the
        # transfer on B goes on to its last byte.
        transfer = PacedTransfer(at_b, 3 << 20, pause=0.05)  # 48 pieces, about 2.4 s
        poll(lambda: transfer.got > 0, 5, "the transfer through B to start")
        back = time.monotonic()
        servers.start("A")
        assert holder.wait("A", 2, timeout=MOVE_LIMIT) == at_a
        moved_at = holder.current()[0]
        served_within(at_a, MOVE_LIMIT, back, "a visitor through server A after it returned")
        transfer.join(timeout=20)
        assert transfer.intact(), f"the transfer through B was cut: {transfer.got} bytes, {transfer.error}"
        assert transfer.ended_at > moved_at, "the transfer ended before the move: it proved nothing"
        # B was left with a goodbye (an info line there, not a fault).
        servers.procs["B"].wait_stderr(r"client disconnected .*moving to the preferred server")
        assert status(client)["server"] == f"127.0.0.1:{servers.ports['A']}"
    finally:
        holder.stop()


def test_every_visitor_through_the_holding_server_is_served_while_servers_die_in_turn(kit):
    """Visitors run in a loop from four threads while A and B are killed and started
    again in turn. A visitor aims at the address of the last `exposed` line the test has
    seen, naming server S. It is counted, and must then be served (SHA-checked echo),
    when S held the service when it began and stayed up until it ended:
    - it began at least MARGIN before the test saw the next `exposed` line (the client
      prints that line before it unregisters the service on S, and the test reads it
      a little later: a visitor that began in that moment may find S's port closed);
    - S was not killed between the line naming it and the visitor's end (a killed
      server cuts its visitors, and until the client has moved, the line names a
      server that is gone).
    A visitor through S that began before the move and ran across it is counted: the
    move must not cut it (a kill of the other server does not matter either)."""
    MARGIN = 0.3
    servers = Servers(kit)
    servers.start("A")
    servers.start("B")
    echo = kit.echo()
    remote = free_port()
    client = kit.spawn(["client", servers.client_arg, "-R", f"{remote}:127.0.0.1:{echo.port}",
                        "--token-file", kit.token_file, *CLIENT_OPTS])
    holder = Holder(client)
    kills: list[tuple[float, str]] = []
    visits: list[tuple[tuple, float, float, str]] = []  # (line aimed at, began, ended, failure or "")
    lock = threading.Lock()
    stop = threading.Event()

    def visitor_loop(n: int) -> None:
        while not stop.is_set():
            seen = holder.current()
            began = time.monotonic()
            payload = os.urandom(16 * 1024 + n)
            failure = ""
            try:
                assert_echoed(seen[2], [payload], timeout=5)
            except (AssertionError, OSError) as e:
                failure = f"{seen[1]} {e!r}"[:200]
            with lock:
                visits.append((seen, began, time.monotonic(), failure))
            if failure:
                time.sleep(0.05)

    def kill(name: str) -> None:
        with lock:
            kills.append((time.monotonic(), name))
        servers.kill(name)

    def load(seconds: float) -> None:
        time.sleep(seconds)  # the visitors run meanwhile: this is the load, not a readiness wait

    try:
        holder.wait("A", 0)
        threads = [threading.Thread(target=visitor_loop, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        load(1.0)
        kill("A")                                 # the holder dies: to B
        holder.wait("B", holder.count() - 1)
        load(1.0)
        servers.start("A")                        # A returns: back to A
        holder.wait("A", holder.count() - 1)
        load(1.0)
        kill("B")                                 # the spare dies and returns
        load(0.5)
        servers.start("B")
        load(1.0)
        kill("A")                                 # the holder dies again: to B
        holder.wait("B", holder.count() - 1)
        load(0.5)
        servers.start("A")
        kill("B")                                 # and B too, before A is taken back
        holder.wait("A", holder.count() - 1)
        load(1.0)
        servers.start("B")
        load(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=10)
    finally:
        stop.set()
        holder.stop()

    moves = holder.moves
    assert [s for _, s, _ in moves] == ["A", "B", "A", "B", "A"], moves

    def counted(seen, began, ended) -> bool:
        i = moves.index(seen)
        next_seen = moves[i + 1][0] if i + 1 < len(moves) else float("inf")
        return began <= next_seen - MARGIN and not any(seen[0] <= t <= ended and name == seen[1] for t, name in kills)

    counted_visits = [(seen[1], failure) for seen, began, ended, failure in visits if counted(seen, began, ended)]
    failed = [f for _, f in counted_visits if f]
    assert not failed, f"{len(failed)} of {len(counted_visits)} counted visitors failed: {failed[:5]}"
    for server in "AB":
        assert sum(1 for s, _ in counted_visits if s == server) >= 10, \
            f"too few visitors counted through {server}: {len(counted_visits)} of {len(visits)} in all"


def test_servers_come_from_the_config_file_and_are_checked(kit, tmp_path, culvert_path):
    config = tmp_path / "client.toml"
    config.write_text('servers = ["127.0.0.1:7101", "127.0.0.1:7102"]\n'
                      f'token_file = "{kit.token_file}"\n[services.web]\nremote_port = 0\nlocal = "127.0.0.1:80"\n')
    r = run_culvert(culvert_path, ["check", "-c", str(config)])
    assert r.returncode == 0, r.stderr
    assert "client: server 127.0.0.1:7101,127.0.0.1:7102," in r.stdout

    both = tmp_path / "both.toml"
    both.write_text('server = "127.0.0.1"\nservers = ["127.0.0.1:7102"]\n' f'token_file = "{kit.token_file}"\n')
    r = run_culvert(culvert_path, ["check", "-c", str(both)])
    assert r.returncode == 2 and "give server or servers, not both" in r.stderr, r.stderr

    r = run_culvert(culvert_path, ["client", "127.0.0.1:7101,127.0.0.1:7101", "-R", "0:127.0.0.1:80",
                                   "--token-file", kit.token_file])
    assert r.returncode == 2 and "server '127.0.0.1:7101' is named twice" in r.stderr, r.stderr
    r = run_culvert(culvert_path, ["client", "127.0.0.1:7101,127.0.0.1:7102", "--visit", "x", "-L", "0",
                                   "--token-file", kit.token_file])
    assert r.returncode == 2 and "--visit goes through one server" in r.stderr, r.stderr
    r = run_culvert(culvert_path, ["client", "127.0.0.1:7101", "-R", "0:127.0.0.1:80", "--failback-interval", "0s",
                                   "--token-file", kit.token_file])
    assert r.returncode == 2 and "--failback-interval must be more than 0" in r.stderr, r.stderr
