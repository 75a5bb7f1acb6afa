"""End-to-end tests for `culvert forward udp`.

Only the observable contract is used: the ready line on stdout
(`listening udp ADDR -> TARGETS`), log lines on stderr, exit codes.
Traffic goes to 127.0.0.1 / ::1 only.  Every loop is bounded in count and
time; readiness is polled with deadlines, never waited for with bare sleeps.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import resource
import select
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import (
    Culvert,
    fmt_addr,
    ipv6_loopback_available,
    parse_text_line,
    run_culvert,
)

UDP_READY_RE = re.compile(r"^listening udp (\S+) -> (\S+)$")
MAX_IPV4_PAYLOAD = 65507


# --------------------------------------------------------------------------
# the culvert process (UDP flavour of conftest.Culvert)


class UdpCulvert(Culvert):
    """conftest.Culvert with the UDP ready line."""

    ready_re = UDP_READY_RE

    def session_closed(self) -> list[dict]:
        return [r for r in self.records() if r.get("msg") == "session closed"]

    def matching(self, msg: str, level: str | None = None, **fields) -> list[dict]:
        """Parsed stderr records with message `msg` whose fields equal `fields`
        (a callable value is a predicate on the field's string)."""
        out = []
        for r in self.records():
            if r.get("msg") != msg or (level and r.get("level") != level):
                continue
            ok = True
            for k, want in fields.items():
                have = r.get(k)
                if callable(want):
                    ok = have is not None and want(have)
                else:
                    ok = have == want
                if not ok:
                    break
            if ok:
                out.append(r)
        return out

    def wait_record(self, msg: str, timeout: float = 10.0, count: int = 1, level: str | None = None, **fields) -> list[dict]:
        """Wait until at least `count` stderr records match (see `matching`)."""

        def have():
            hits = self.matching(msg, level, **fields)
            return hits if len(hits) >= count else None

        return self._wait_for(have, timeout, f"{count} {msg!r} record(s) with {fields}")


@pytest.fixture
def start_udp(culvert_path):
    """start_udp(listen, *targets, opts=[...], nofile=N) -> UdpCulvert past its ready
    line; with `nofile`, under that descriptor limit.  Every process is killed at teardown."""
    procs: list[UdpCulvert] = []

    def start(listen: str, *targets: str, opts=(), ready: int = 1, timeout: float = 15.0,
              nofile: int | None = None) -> UdpCulvert:
        args = ["forward", "udp", *opts, listen, *targets]
        if nofile is None:
            c = UdpCulvert(culvert_path, args)
        else:  # soft = hard, so culvert cannot raise it
            c = UdpCulvert("prlimit", [f"--nofile={nofile}:{nofile}", culvert_path, *args])
        procs.append(c)
        if ready:
            c.wait_ready(ready, timeout=timeout)
        return c

    yield start
    for c in procs:
        c.kill()
        print(c.describe(tail=60))


# --------------------------------------------------------------------------
# UDP helper servers and clients (loopback only)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class UdpServer:
    """A thread answering each datagram with handler(data) (None: no answer)."""

    def __init__(self, handler, host: str = "127.0.0.1", port: int = 0):
        self.handler = handler
        self.host = host
        self.sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
            except OSError:
                pass
        self.sock.bind((host, port))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        self.received = 0
        self.peers: set = set()
        self.send_failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return fmt_addr(self.host, self.port)

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                if not sel.select(0.1):
                    continue
                for _ in range(10_000):  # bounded drain
                    try:
                        data, peer = self.sock.recvfrom(65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        if self._stop.is_set():
                            return
                        break
                    with self._lock:
                        self.received += 1
                        self.peers.add(peer[:2])
                    reply = self.handler(data)
                    if reply is not None:
                        self._send(reply, peer)
        finally:
            sel.close()

    def _send(self, reply: bytes, peer) -> None:
        for _ in range(3):
            try:
                self.sock.sendto(reply, peer)
                return
            except (BlockingIOError, InterruptedError):
                select.select([], [self.sock], [], 1.0)
            except OSError:
                break
        with self._lock:
            self.send_failures += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def echo(data: bytes) -> bytes:
    return data


def hash_tag(data: bytes) -> bytes:
    """sha256(datagram) + the datagram's first 16 bytes (the client's id)."""
    return hashlib.sha256(data).digest() + data[:16]


@pytest.fixture
def udp_servers():
    started: list[UdpServer] = []

    def make(handler=echo, host: str = "127.0.0.1", port: int = 0) -> UdpServer:
        s = UdpServer(handler, host, port)
        started.append(s)
        return s

    yield make
    for s in started:
        s.close()


def dead_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nothing listens on (bound, then closed): datagrams to it get
    ICMP port unreachable."""
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def udp_client(addr: tuple[str, int], timeout: float = 2.0) -> socket.socket:
    host, _ = addr
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(timeout)
    return s


def local_addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return fmt_addr(host, port)


def request(sock: socket.socket, addr, payload: bytes, expect, tries: int = 5, wait: float = 1.0) -> bytes:
    """Send payload to addr until a datagram `expect(reply)` accepts arrives
    (at most `tries` sends, `wait` seconds each).  Returns that reply."""
    for _ in range(tries):
        sock.sendto(payload, addr)
        deadline = time.monotonic() + wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                reply, src = sock.recvfrom(65536)
            except socket.timeout:
                break
            except ConnectionRefusedError:
                continue
            assert src[:2] == tuple(addr)[:2], f"reply from {src}, expected {addr}"
            if expect(reply):
                return reply
    raise AssertionError(f"no acceptable reply to a {len(payload)}-byte datagram after {tries} tries")


def expect_silence(sock: socket.socket, seconds: float) -> None:
    sock.settimeout(seconds)
    try:
        data, src = sock.recvfrom(65536)
    except socket.timeout:
        return
    raise AssertionError(f"unexpected {len(data)}-byte datagram from {src}")


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    new = hard if hard == resource.RLIM_INFINITY else min(max(want, soft), hard)
    if new != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        pytest.skip(f"RLIMIT_NOFILE {soft} < {want} and cannot be raised")


def stop(c: UdpCulvert, timeout: float = 10.0) -> int:
    """SIGTERM, then the exit code (bounded wait; stderr fully collected)."""
    return c.terminate(timeout)


# --------------------------------------------------------------------------
# 1. many clients, no cross-talk


def test_thousand_clients_verified_without_cross_talk(start_udp, udp_servers):
    n_clients = 1000
    raise_nofile(4 * n_clients + 256)
    server = udp_servers(hash_tag)
    c = start_udp("127.0.0.1:0", server.address)
    addr = c.addr
    rng = random.Random(1234)

    clients: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        # per client: unique 16-byte id, 3 small datagrams of 16..1400 bytes + one
        # of 8 KiB, each starting with the id.  (Below 16 bytes the datagrams of
        # different clients could be identical, and a misrouted reply could not
        # be told apart; tiny datagrams are covered by the boundaries test.)
        state = []
        for i in range(n_clients):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            clients.append(s)
            cid = hashlib.md5(f"client-{i}".encode()).digest()  # 16 bytes, unique
            sizes = [rng.randint(16, 1400) for _ in range(3)] + [8192]
            dgrams = [cid + rng.randbytes(size - 16) for size in sizes]
            state.append({
                "id": cid,
                "dgrams": dgrams,
                "expected": {hashlib.sha256(d).digest(): k for k, d in enumerate(dgrams)},
                "next": 0,          # index of the datagram in flight
                "sent_at": 0.0,
                "tries": 0,
                "done": False,
                "sent_bytes": 0,
            })
            sel.register(s, selectors.EVENT_READ, i)

        window = 100           # clients with a datagram in flight at once
        max_tries = 6          # sends per datagram (loss on loopback should be ~0)
        retry_after = 1.0
        deadline = time.monotonic() + 40
        cross_talk: list[str] = []
        resends = 0
        pending = list(range(n_clients))  # not yet started, in order
        active: set[int] = set()

        def send(i: int) -> None:
            st = state[i]
            d = st["dgrams"][st["next"]]
            clients[i].sendto(d, addr)
            st["sent_at"] = time.monotonic()
            st["tries"] += 1
            st["sent_bytes"] += len(d)

        done = 0
        while done < n_clients:
            now = time.monotonic()
            assert now < deadline, (
                f"only {done}/{n_clients} clients finished in time; resends={resends}\n{c.describe()}"
            )
            while pending and len(active) < window:
                i = pending.pop()
                active.add(i)
                send(i)
            for key, _ in sel.select(0.05):
                i = key.data
                st = state[i]
                for _ in range(64):  # bounded drain of this socket
                    try:
                        reply, src = clients[i].recvfrom(65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    if src[:2] != addr:
                        cross_talk.append(f"client {i}: reply from unexpected {src}")
                        continue
                    digest, tag = reply[:32], reply[32:]
                    if len(reply) != 48 or digest not in st["expected"]:
                        cross_talk.append(
                            f"client {i}: reply {reply[:48].hex()} is not sha256 of any of its datagrams"
                        )
                        continue
                    want_tag = st["dgrams"][st["expected"][digest]][:16]
                    if tag != want_tag:
                        cross_talk.append(f"client {i}: tag {tag.hex()} != {want_tag.hex()}")
                        continue
                    if st["done"] or st["expected"][digest] != st["next"]:
                        continue  # late duplicate of an already answered (resent) datagram
                    st["next"] += 1
                    st["tries"] = 0
                    if st["next"] == len(st["dgrams"]):
                        st["done"] = True
                        active.discard(i)
                        done += 1
                    else:
                        send(i)
            assert not cross_talk, f"{len(cross_talk)} cross-talk replies, e.g. {cross_talk[:5]}"
            now = time.monotonic()
            for i in list(active):
                st = state[i]
                if now - st["sent_at"] >= retry_after:
                    assert st["tries"] < max_tries, (
                        f"client {i}: datagram {st['next']} ({len(st['dgrams'][st['next']])} bytes) "
                        f"unanswered after {st['tries']} sends\n{c.describe()}"
                    )
                    resends += 1
                    send(i)
        assert not cross_talk, f"{len(cross_talk)} cross-talk replies, e.g. {cross_talk[:5]}"

        client_addrs = {local_addr(s) for s in clients}
        assert c.running(), c.describe()
        rc = stop(c, timeout=20)
        assert rc == 0, f"exit code {rc}\n{c.describe()}"
        closed = c.session_closed()
        print(f"clients={n_clients} sessions closed={len(closed)} resends={resends} server got={server.received}")
        by_peer: dict[str, list[dict]] = {}
        for r in closed:
            by_peer.setdefault(r.get("peer"), []).append(r)
        missing = client_addrs - set(by_peer)
        assert not missing, f"{len(missing)} clients without a 'session closed' line, e.g. {sorted(missing)[:5]}"
        assert len(closed) >= n_clients
        # Nothing idles out (60 s default), so exactly one session per client.
        extra = {p: rs for p, rs in by_peer.items() if p in client_addrs and len(rs) != 1}
        assert not extra, f"clients with != 1 session: {list(extra.items())[:3]}"
        for r in closed:
            if r.get("peer") in client_addrs:
                assert r.get("reason") == "shutdown", r
                assert r.get("target") == server.address, r
        # Byte/datagram counters (retries make them larger, never smaller).
        total_up = sum(int(r["up"]) for p, rs in by_peer.items() if p in client_addrs for r in rs)
        total_dg = sum(int(r["datagrams_up"]) for p, rs in by_peer.items() if p in client_addrs for r in rs)
        min_bytes = sum(sum(len(d) for d in st["dgrams"]) for st in state)
        assert total_up >= min_bytes and total_dg >= 4 * n_clients, (total_up, min_bytes, total_dg)
        if resends == 0:
            assert total_up == min_bytes and total_dg == 4 * n_clients, (total_up, min_bytes, total_dg)
            downs = {int(r["datagrams_down"]) for rs in by_peer.values() for r in rs}
            assert downs == {4}, downs
    finally:
        sel.close()
        for s in clients:
            s.close()


# --------------------------------------------------------------------------
# 2. datagram boundaries


def test_large_datagrams_keep_boundaries(start_udp, udp_servers):
    server = udp_servers(echo)
    c = start_udp("127.0.0.1:0", server.address)
    addr = c.addr
    sizes = [MAX_IPV4_PAYLOAD, 1, 0, 1, MAX_IPV4_PAYLOAD, 0, 0, 1400, 65000, 2]
    rng = random.Random(7)
    with udp_client(addr) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        failures = []
        # one at a time: each receive must be exactly one whole datagram
        for k, size in enumerate(sizes):
            payload = rng.randbytes(size)
            s.sendto(payload, addr)
            s.settimeout(3.0)
            try:
                got, _ = s.recvfrom(70000)
            except socket.timeout:
                failures.append(f"#{k}: no reply to a {size}-byte datagram within 3s")
                continue
            if got != payload:
                failures.append(f"#{k}: sent {size} bytes, got {len(got)} bytes (equal={got == payload})")
        assert not failures, "\n".join(failures) + "\n" + c.describe()

        # a burst: boundaries kept, every datagram comes back once, whole
        burst = [rng.randbytes(n) for n in (MAX_IPV4_PAYLOAD, 1, 0, 30000, 1, MAX_IPV4_PAYLOAD, 0, 512)]
        for p in burst:
            s.sendto(p, addr)
        got = []
        s.settimeout(3.0)
        for _ in burst:
            try:
                got.append(s.recvfrom(70000)[0])
            except socket.timeout:
                break
        assert sorted(got) == sorted(burst), (
            f"sent sizes {[len(p) for p in burst]}, got {[len(g) for g in got]}\n{c.describe()}"
        )
        expect_silence(s, 0.2)
    assert stop(c) == 0
    closed = c.session_closed()
    assert len(closed) == 1, closed
    total = sum(sizes) + sum(len(p) for p in burst)
    n = len(sizes) + len(burst)
    r = closed[0]
    assert (int(r["up"]), int(r["down"]), int(r["datagrams_up"]), int(r["datagrams_down"])) == (
        total, total, n, n
    ), r


# --------------------------------------------------------------------------
# 3. DNS-like request/response


def dns_answer(name: bytes) -> bytes:
    return hashlib.sha256(b"A:" + name).digest()[:4] + name[::-1]


def dns_server(data: bytes):
    if len(data) < 3:
        return None
    return data[:2] + dns_answer(data[2:])


def test_dns_like_request_response(start_udp, udp_servers):
    server = udp_servers(dns_server)
    c = start_udp("127.0.0.1:0", server.address)
    addr = c.addr
    rng = random.Random(53)
    ids = rng.sample(range(65536), 50)
    queries = {qid: f"host{k}.{rng.randrange(10**6)}.example.test".encode() for k, qid in enumerate(ids)}
    answered: dict[int, bytes] = {}
    wrong = []
    with udp_client(addr) as s:
        for qid, name in queries.items():
            s.sendto(struct.pack("!H", qid) + name, addr)
        for _round in range(5):  # bounded resends of unanswered queries
            deadline = time.monotonic() + 1.5
            while len(answered) < len(queries):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                s.settimeout(remaining)
                try:
                    reply, _ = s.recvfrom(65536)
                except socket.timeout:
                    break
                (qid,) = struct.unpack("!H", reply[:2])
                if qid not in queries:
                    wrong.append(f"unknown id {qid}")
                elif reply[2:] != dns_answer(queries[qid]):
                    wrong.append(f"id {qid}: wrong answer {reply[2:]!r}")
                else:
                    answered[qid] = reply
            if len(answered) == len(queries):
                break
            for qid in set(queries) - set(answered):
                s.sendto(struct.pack("!H", qid) + queries[qid], addr)
    assert not wrong, wrong
    assert set(answered) == set(queries), f"unanswered ids {sorted(set(queries) - set(answered))}"
    assert stop(c) == 0
    assert len(c.session_closed()) == 1, c.describe()


# --------------------------------------------------------------------------
# 4. idle timeout


def test_idle_timeout_closes_sessions_and_new_datagram_opens_new_one(start_udp, udp_servers):
    server = udp_servers(echo)
    c = start_udp("127.0.0.1:0", server.address, opts=["--idle-timeout", "1s", "--log-level", "debug"])
    addr = c.addr
    with udp_client(addr) as s:
        me = local_addr(s)
        assert request(s, addr, b"first", lambda r: r == b"first") == b"first"
        c.wait_record("session opened", level="debug", peer=me, target=server.address, timeout=5)
        t0 = time.monotonic()
        rec = c.wait_record("session closed", level="info", peer=me, reason="idle-timeout", timeout=6)[0]
        waited = time.monotonic() - t0
        assert rec["up"] == "5" and rec["down"] == "5", rec
        assert rec["datagrams_up"] == "1" and rec["datagrams_down"] == "1", rec
        # duration is a little over the idle timeout (sweep granularity)
        dur = float(rec["duration"].rstrip("s"))
        assert 0.9 <= dur <= 3.0, rec
        assert waited <= 4.0
        # same client socket again: a new session, correct reply
        assert request(s, addr, b"second", lambda r: r == b"second") == b"second"
        c.wait_record("session opened", level="debug", peer=me, timeout=5, count=2)
    assert stop(c) == 0
    closed = [r for r in c.session_closed() if r["peer"] == me]
    assert [r["reason"] for r in closed] == ["idle-timeout", "shutdown"], closed
    assert closed[1]["up"] == "6" and closed[1]["datagrams_up"] == "1", closed[1]


# --------------------------------------------------------------------------
# 5. target down


def test_target_down_no_crash_clear_log(start_udp, udp_servers):
    port = dead_udp_port()
    target = fmt_addr("127.0.0.1", port)
    c = start_udp("127.0.0.1:0", target, opts=["--log-level", "debug"])
    addr = c.addr
    with udp_client(addr) as s:
        me = local_addr(s)
        for k in range(5):
            s.sendto(b"hello %d" % k, addr)
            # every session dies of the ICMP port unreachable before the next datagram
            c.wait_record("session closed", peer=me, target=target, reason="target-error", timeout=5, count=k + 1)
        expect_silence(s, 0.2)
        unreachable = c.wait_record("target unreachable", level="warning", peer=me, target=target, timeout=2)
        assert all("ECONNREFUSED" in r.get("error", "") for r in unreachable), unreachable
        assert c.running(), c.describe()

        # now bring the target up on that very port: datagrams get answered
        udp_servers(echo, port=port)
        reply = request(s, addr, b"are you there", lambda r: r == b"are you there", tries=20, wait=0.25)
        assert reply == b"are you there"
    # the reply came through a new (6th) session; its log line may trail the reply
    c.wait_record("session opened", level="debug", peer=me, target=target, count=6, timeout=5)
    assert stop(c) == 0
    closed = [r for r in c.session_closed() if r["peer"] == me]
    assert closed[-1]["reason"] == "shutdown" and int(closed[-1]["datagrams_down"]) >= 1, closed[-1]
    assert all(r["reason"] == "target-error" for r in closed[:-1]), closed


# --------------------------------------------------------------------------
# 6. --max-sessions


def test_max_sessions_enforced(start_udp, udp_servers):
    server = udp_servers(echo)
    c = start_udp("127.0.0.1:0", server.address, opts=["--max-sessions", "5"])
    addr = c.addr
    socks = [udp_client(addr) for _ in range(6)]
    sixth_addr = local_addr(socks[5])
    try:
        for k, s in enumerate(socks[:5]):
            p = b"client %d" % k
            assert request(s, addr, p, lambda r, p=p: r == p) == p
        sixth = socks[5]
        sixth.sendto(b"sixth", addr)
        expect_silence(sixth, 1.0)
        sixth.sendto(b"sixth again", addr)
        for k, s in enumerate(socks[:5]):
            p = b"still here %d" % k
            assert request(s, addr, p, lambda r, p=p: r == p, tries=2) == p
        expect_silence(sixth, 0.3)
        assert c.running(), c.describe()
        rc = stop(c)
        assert rc == 0, f"exit code {rc}\n{c.describe()}"
    finally:
        for s in socks:
            s.close()
    drops = [parse_text_line(l) for l in c.stderr_matching(r"^warning datagrams dropped ")]
    assert drops, f"no 'datagrams dropped' line\n{c.describe()}"
    assert sum(int(d["session_limit"]) for d in drops) >= 2, drops
    assert all(d["max_sessions"] == "5" for d in drops), drops
    closed = c.session_closed()
    assert len(closed) == 5, closed
    assert sixth_addr not in {r["peer"] for r in closed}


def flood_from_many_sources(addr, count: int, every, between: int = 500) -> float:
    """One datagram from each of `count` client addresses (127.0.0.2-251, a fresh
    port each; a socket is closed before the next opens, so this process holds one
    at a time), calling every() after each `between`.  Returns the seconds taken."""
    t0 = time.monotonic()
    for i in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((f"127.0.0.{2 + i % 250}", 0))
            s.sendto(b"flood %d" % i, addr)
        if i % between == between - 1:
            every()
    return time.monotonic() - t0


@pytest.mark.parametrize(
    "opts, counter",
    [
        pytest.param([], "session_limit", id="default-limit"),
        pytest.param(["--max-sessions", "0"], "no_descriptor", id="no-limit-runs-out-of-descriptors"),
    ],
)
def test_source_flood_is_summarised_and_service_recovers(start_udp, udp_servers, opts, counter):
    # 3,000 client addresses against 256 descriptors: by the default session limit, or
    # (no limit) by EMFILE.  Either way the process lives, logs a few summary lines
    # rather than one per datagram, keeps serving the session it had, and takes new
    # clients again once the flood's sessions have idled out.
    server = udp_servers(echo)
    c = start_udp("127.0.0.1:0", server.address, nofile=256,
                  opts=["--idle-timeout", "1s", "--threads", "2", *opts])
    addr = c.addr
    checks = 0
    with udp_client(addr) as old:
        def old_session_answers():
            nonlocal checks
            p = os.urandom(48)
            assert request(old, addr, p, lambda r, p=p: r == p, tries=3, wait=0.5) == p, c.describe()
            checks += 1

        old_session_answers()
        seconds = flood_from_many_sources(addr, 3000, old_session_answers)
        assert seconds < 5, f"the flood took {seconds:.1f}s"
        old_session_answers()
        assert checks == 8 and c.running(), c.describe()

        # a new client gets through once the flood's sessions idle out (1 s, swept every 0.25 s)
        t0 = time.monotonic()
        with udp_client(addr) as new:
            p = os.urandom(48)
            assert request(new, addr, p, lambda r, p=p: r == p, tries=20, wait=0.25) == p
        assert time.monotonic() - t0 < 3, f"new client waited {time.monotonic() - t0:.1f}s"
        old_session_answers()
    assert stop(c) == 0, c.describe()

    assert not c.stderr_matching(r"^warning cannot open session socket"), c.describe()
    drops = [parse_text_line(l) for l in c.stderr_matching(r"^warning datagrams dropped ")]
    # at most once a second per loop while flooding, plus once per loop at shutdown
    assert 1 <= len(drops) <= 2 * (int(seconds) + 2), drops
    assert sum(int(d[counter]) for d in drops) >= 100, drops
    assert len(c.stderr_lines) < 1000, f"{len(c.stderr_lines)} log lines"


def test_default_session_limit_follows_descriptor_limit(start_udp, udp_servers):
    # With no --max-sessions the limit is half the descriptors free at start, stated
    # in one info line; under 128 descriptors that is a few dozen sessions.
    server = udp_servers(echo)
    c = start_udp("127.0.0.1:0", server.address, nofile=128, opts=["--threads", "1"])
    addr = c.addr
    line = c.wait_record("session limit", level="info", timeout=5)[0]
    free, limit = int(line["free_descriptors"]), int(line["max_sessions"])
    assert line["from"] == "default" and 100 < free < 128 and limit == free // 2, line
    assert not c.matching("session limit exceeds free descriptors"), c.describe()

    socks = [udp_client(addr) for _ in range(limit + 1)]
    try:
        for k, s in enumerate(socks[:limit]):
            p = b"client %d" % k
            assert request(s, addr, p, lambda r, p=p: r == p) == p
        socks[limit].sendto(b"one too many", addr)
        expect_silence(socks[limit], 0.5)
        assert request(socks[0], addr, b"still here", lambda r: r == b"still here") == b"still here"
    finally:
        for s in socks:
            s.close()
    assert stop(c) == 0, c.describe()
    drops = [parse_text_line(l) for l in c.stderr_matching(r"^warning datagrams dropped ")]
    assert sum(int(d["session_limit"]) for d in drops) >= 1, drops
    assert all(d["max_sessions"] == str(limit) for d in drops), drops
    assert len(c.session_closed()) == limit


def test_default_session_limit_is_at_most_10000(start_udp, udp_servers):
    if subprocess.run(["prlimit", "--nofile=100000:100000", "true"]).returncode != 0:
        pytest.skip("cannot raise RLIMIT_NOFILE to 100000 (not root)")
    server = udp_servers(echo)
    c = start_udp("127.0.0.1:0", server.address, nofile=100000)
    line = c.wait_record("session limit", level="info", timeout=5)[0]
    assert (line["from"], line["max_sessions"]) == ("default", "10000"), line
    assert int(line["free_descriptors"]) > 99000, line


def test_max_sessions_above_free_descriptors_warns(start_udp, udp_servers):
    server = udp_servers(echo)
    c = start_udp("127.0.0.1:0", server.address, nofile=256, opts=["--max-sessions", "1000"])
    line = c.wait_record("session limit exceeds free descriptors", level="warning", timeout=5)[0]
    assert line["max_sessions"] == "1000" and line["from"] == "--max-sessions", line
    assert int(line["free_descriptors"]) < 256, line


# --------------------------------------------------------------------------
# 7. --balance first: failover


def test_failover_first_balance(start_udp, udp_servers):
    dead = fmt_addr("127.0.0.1", dead_udp_port())
    live = udp_servers(lambda d: b"live:" + d)
    c = start_udp("127.0.0.1:0", dead, live.address, opts=["--balance", "first"])
    addr = c.addr
    with udp_client(addr) as s:
        me = local_addr(s)
        got = None
        for _ in range(25):  # bounded: 25 tries, 0.2 s apart (a loaded machine may lag)
            s.sendto(b"query", addr)
            s.settimeout(0.2)
            try:
                got, _ = s.recvfrom(65536)
                break
            except socket.timeout:
                continue
        assert got == b"live:query", f"no answer from the live target after 25 tries\n{c.describe()}"
    recs = c.wait_record("target unreachable", level="warning", target=dead, peer=me, timeout=2)
    assert "ECONNREFUSED" in recs[0].get("error", ""), recs
    c.wait_record("session closed", peer=me, target=dead, reason="target-error", timeout=2)
    assert stop(c) == 0
    last = [r for r in c.session_closed() if r["peer"] == me][-1]
    assert last["target"] == live.address and last["reason"] == "shutdown", last


# --------------------------------------------------------------------------
# 8. IPv6


def test_ipv6(start_udp, udp_servers):
    if not ipv6_loopback_available():
        pytest.skip("::1 not available")
    server = udp_servers(echo, host="::1")
    c = start_udp("[::1]:0", server.address)
    listen, targets = c.ready[0]
    assert listen.startswith("[::1]:") and targets == server.address, c.ready
    addr = c.addr
    assert addr[0] == "::1"
    with udp_client(addr) as s:
        for size in (1, 1200, 20000):
            p = os.urandom(size)
            assert request(s, addr, p, lambda r, p=p: r == p) == p
        me = local_addr(s)
    assert stop(c) == 0
    closed = c.session_closed()
    assert [r["peer"] for r in closed] == [me], closed
    assert closed[0]["target"] == server.address


# --------------------------------------------------------------------------
# 9. usage errors


@pytest.mark.parametrize(
    "args, named",
    [
        pytest.param(["127.0.0.1:0"], "<targets>", id="missing-target"),
        pytest.param(["--max-sessions", "-1", "127.0.0.1:0", "127.0.0.1:9"], "--max-sessions", id="max-sessions--1"),
        pytest.param(["--max-sessions=-1", "127.0.0.1:0", "127.0.0.1:9"], "--max-sessions", id="max-sessions=-1"),
        pytest.param(["--idle-timeout", "0", "127.0.0.1:0", "127.0.0.1:9"], "--idle-timeout", id="idle-timeout-0"),
        pytest.param(["--socket-buffer", "5G", "127.0.0.1:0", "127.0.0.1:9"], "--socket-buffer", id="socket-buffer-5G"),
        pytest.param(["--socket-buffer", "2048M", "127.0.0.1:0", "127.0.0.1:9"], "--socket-buffer", id="socket-buffer-2048M"),
    ],
)
def test_bad_arguments_exit_2(culvert_path, args, named):
    r = run_culvert(culvert_path, ["forward", "udp", *args])
    assert r.returncode == 2, f"exit {r.returncode}; stderr={r.stderr!r}"
    # the error line itself must name it (the usage line names every option)
    errors = [l for l in r.stderr.splitlines() if l.startswith("Error")]
    assert errors and named in errors[0], f"error line does not name {named!r}: {r.stderr!r}"
    assert r.stdout == "", r.stdout


# --------------------------------------------------------------------------
# 10. SIGTERM


def test_sigterm_exits_0_and_logs_shutdown(start_udp, udp_servers):
    server = udp_servers(echo)
    c = start_udp("127.0.0.1:0", server.address)
    addr = c.addr
    socks = [udp_client(addr) for _ in range(3)]
    try:
        for k, s in enumerate(socks):
            for size in (100, 200):
                p = bytes([k]) * size
                assert request(s, addr, p, lambda r, p=p: r == p) == p
        me = {local_addr(s) for s in socks}
        t0 = time.monotonic()
        c.send_signal(signal.SIGTERM)
        rc = c.wait_exit(10)
        assert rc == 0, f"exit code {rc}\n{c.describe()}"
        assert time.monotonic() - t0 < 5, "SIGTERM took too long"
    finally:
        for s in socks:
            s.close()
    closed = c.session_closed()
    assert {r["peer"] for r in closed} == me and len(closed) == 3, closed
    for r in closed:
        assert r["level"] == "info" and r["reason"] == "shutdown", r
        assert r["target"] == server.address, r
        assert (r["up"], r["down"], r["datagrams_up"], r["datagrams_down"]) == ("300", "300", "2", "2"), r
        assert re.fullmatch(r"\d+(\.\d+)?s", r["duration"]), r
    assert not c.stderr_matching(r"^(error|critical) "), c.describe()
