"""End-to-end tests for the tunnel: `culvert server` + `culvert client` on loopback."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import select
import signal
import socket
import struct
import threading
import time

import pytest

from conftest import (
    MiB,
    RespondAfterEofServer,
    echo_once,
    recv_all,
    recv_exactly,
)
from tunnel_support import (
    CHALLENGE,
    CONNECT,
    MUX,
    PROTOCOL_VERSION,
    DATA_HELLO,
    HELLO,
    MODES,
    REFUSED,
    WELCOME,
    CloseFirstServer,
    RecordingRelay,
    close_wait_pids,
    connect_refused,
    echo_many,
    half_close_exchange,
    fd_count,
    frames_until_close,
    free_port,
    hello,
    local_of,
    poll,
    raw_connect,
    read_frame,
    run_cli,
    run_threads,
    settle_fd_count,
    split_frames,
    wait_closed_no_data,
    clean_env,
)


# one random block; each connection sends its own slice of it
_BLOCK = os.urandom(4 * MiB)


def payload(i: int) -> bytes:
    off = (i * 40961) % (2 * MiB)
    return _BLOCK[off:off + 2 * MiB - i * 7]


# --------------------------------------------------------------------------
# 1. data integrity per transport


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


def test_concurrent_echo_verified(kit, mode):
    echo = kit.echo()
    srv = kit.start_server(mode)
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], mode, opts=["--pool", "4"])
    addr = cli.exposed_map[local_of(echo)]
    assert addr[1] != 0

    n = 50
    results = echo_many(addr, [payload(i) for i in range(n)], timeout=90)
    bad = [i for i in range(n)
           if results.get(i) != (len(payload(i)), hashlib.sha256(payload(i)).hexdigest())]
    assert not bad, f"{len(bad)} connection(s) with wrong echo, e.g. {bad[:5]}: {[results.get(i) for i in bad[:3]]}"
    # the server logs every visitor connection, with byte counts
    srv.wait_stderr(r"connection closed .*reason=eof", count=n, timeout=20)
    ups = {int(m) for l in srv.stderr_matching(r"connection closed") for m in re.findall(r" up=(\d+)", l)}
    missing = [i for i in range(n) if len(payload(i)) not in ups]
    assert not missing, f"no server log line with up=<size> for connections {missing[:5]}"


def test_half_close_and_port_zero(kit, mode):
    response = os.urandom(3 * MiB)
    rae = kit.local(RespondAfterEofServer(response))
    echo = kit.echo()
    srv = kit.start_server(mode)
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(rae)}", f"0:{local_of(echo)}"], mode)
    a_rae = cli.exposed_map[local_of(rae)]
    a_echo = cli.exposed_map[local_of(echo)]
    assert a_rae[1] != 0 and a_echo[1] != 0 and a_rae != a_echo
    assert a_rae[0] == "127.0.0.1"  # the server's --bind-addr
    # the server-side line names the same address
    srv.wait_stderr(rf"service exposed listen=127\.0\.0\.1:{a_rae[1]} ")

    request = os.urandom(1 * MiB)
    half_close_exchange(a_rae, request, response, timeout=30)
    poll(lambda: rae.received == [len(request)], 5, "local service to record the request")
    echo_once(a_echo, b"port zero works")


# --------------------------------------------------------------------------
# 1b. certificate modes


def test_cert_fingerprint_pin(kit):
    echo = kit.echo()
    srv = kit.start_server("tls-cert")
    cli = kit.start_client(f"127.0.0.1:{srv.server_addr[1]}", [f"0:{local_of(echo)}"], "tls-cert",
                           mode_args=["--fingerprint", kit.certs.fingerprint])
    echo_once(cli.exposed_map[local_of(echo)], b"pinned")


def test_cert_fingerprint_pin_uppercase_with_colons(kit):
    echo = kit.echo()
    srv = kit.start_server("tls-cert")
    hexfp = kit.certs.fingerprint[7:].upper()
    fp = "sha256:" + ":".join(hexfp[i:i + 2] for i in range(0, 64, 2))
    cli = kit.start_client(f"127.0.0.1:{srv.server_addr[1]}", [f"0:{local_of(echo)}"], "tls-cert",
                           mode_args=["--fingerprint", fp])
    echo_once(cli.exposed_map[local_of(echo)], b"pinned")


def test_cert_wrong_fingerprint(kit):
    srv = kit.start_server("tls-cert")
    good = kit.certs.fingerprint
    wrong = good[:-1] + ("0" if good[-1] != "0" else "1")
    cli = kit.start_client(f"127.0.0.1:{srv.server_addr[1]}", ["0:127.0.0.1:9"], "tls-cert",
                           mode_args=["--fingerprint", wrong], ready=False)
    rc = cli.wait_exit(10)
    assert rc == 1, cli.describe()
    assert "fingerprint" in cli.stderr_text(), cli.describe()
    assert not cli.stdout_lines, cli.describe()
    assert not srv.stderr_matching(r"client connected"), srv.describe()


@pytest.mark.parametrize("how", ["no-ca-no-fingerprint", "other-ca"])
def test_cert_server_unverifiable_client_fails(kit, how):
    srv = kit.start_server("tls-cert")
    mode_args = [] if how == "no-ca-no-fingerprint" else ["--ca", kit.certs.other_ca]
    cli = kit.start_client(f"localhost:{srv.server_addr[1]}", ["0:127.0.0.1:9"], "tls-cert",
                           mode_args=mode_args, ready=False)
    poll(lambda: cli.proc.poll() is not None or cli.stdout_lines, 10, "the client to exit (or to succeed)")
    assert not cli.stdout_lines, (
        "client trusted a server certificate it could not verify and exposed a service\n"
        f"{cli.describe()}\n{srv.describe()}")
    rc = cli.wait_exit(5)
    assert rc == 1, cli.describe()
    assert "authentication failed" in cli.stderr_text(), cli.describe()
    if how == "other-ca":
        # The client's own check failed: say so, not that the server refused.
        assert "the server's certificate did not verify for the name 'localhost'" in cli.stderr_text(), cli.describe()
        assert "server rejected" not in cli.stderr_text(), cli.describe()
    assert not cli.stdout_lines, cli.describe()
    assert not srv.stderr_matching(r"client connected|service exposed"), srv.describe()


def test_cert_name_mismatch_fails(kit):
    """--ca checks the name: the certificate covers localhost/127.0.0.1, not 127.0.0.2."""
    srv = kit.start_server("tls-cert", opts=["--listen", "127.0.0.2:0"], wait=False)
    addrs = srv.listen_addrs(2)
    other = [a for a in addrs if a[0] == "127.0.0.2"][0]
    cli = kit.start_client(f"127.0.0.2:{other[1]}", ["0:127.0.0.1:9"], "tls-cert", ready=False)
    rc = cli.wait_exit(10)
    assert rc == 1, cli.describe()
    assert "did not verify for the name '127.0.0.2'" in cli.stderr_text(), cli.describe()
    assert not srv.stderr_matching(r"client connected"), srv.describe()


# --------------------------------------------------------------------------
# 2. tokens


@pytest.mark.parametrize("transport", ["tls", "plain"])
def test_wrong_token(kit, transport):
    mode = "plain" if transport == "plain" else "tls-psk"
    srv = kit.start_server(mode)
    other = kit.write_token(run_cli(["token"]).stdout.strip(), "other-token")
    t0 = time.monotonic()
    cli = kit.start_client(srv.server_addr, ["0:127.0.0.1:9"], mode, token_file=other, ready=False)
    rc = cli.wait_exit(10)
    elapsed = time.monotonic() - t0
    assert rc == 1, cli.describe()
    assert elapsed < 8, f"client took {elapsed:.1f}s to give up"
    assert "authentication failed" in cli.stderr_text(), cli.describe()
    if transport == "plain":
        # the tokens differ: said so, with what to check, not as an impostor server
        assert "give both ends the same token" in cli.stderr_text(), cli.describe()
    assert not cli.stdout_lines, cli.describe()
    srv.wait_stderr(r"(authentication failed|handshake failed).*peer=127\.0\.0\.1:\d+", timeout=5)
    assert not srv.stderr_matching(r"client connected"), srv.describe()


def test_server_without_token(kit):
    r = run_cli(["server", "--listen", "127.0.0.1:0"], env=clean_env())
    assert r.returncode == 2, r
    assert "token" in r.stderr.lower(), r.stderr
    assert "listening" not in r.stdout


def test_client_without_token(kit):
    r = run_cli(["client", "127.0.0.1:1", "-R", "0:127.0.0.1:9"], env=clean_env())
    assert r.returncode == 2, r
    assert "token" in r.stderr.lower(), r.stderr


@pytest.mark.parametrize("specs,message", [
    (["20022:127.0.0.1:22", "20022:127.0.0.1:2222"], "both ask for tcp port 20022"),
    (["myhost:20022:127.0.0.1:22"], "BIND 'myhost' is not a numeric IP address"),
])
def test_client_service_conflicts_are_usage_errors(kit, specs, message):
    # found before connecting (the server address here answers nothing), exit 2
    args = ["client", "127.0.0.1:1", "--token-file", kit.token_file]
    for spec in specs:
        args += ["-R", spec]
    r = run_cli(args, timeout=10)
    assert r.returncode == 2, r
    assert message in r.stderr, r.stderr
    assert r.stdout == "", r.stdout


def test_short_token_refused(kit):
    # once a warning; a short token lets anyone who sees the server's proof guess it
    # offline, so it is refused (more cases in test_tunnel_tokens.py)
    short = kit.write_token("short", "short-token")
    r = run_cli(["server", "--listen", "127.0.0.1:0", "--token-file", short], timeout=10)
    assert r.returncode == 2, r
    assert f"the token in --token-file '{short}' is too short (5 bytes)" in r.stderr, r.stderr
    assert "'culvert token'" in r.stderr and "listening" not in r.stdout, r


def test_token_from_env(kit):
    echo = kit.echo()
    srv = kit.start_server("tls-psk")
    # the client gets the token from CULVERT_TOKEN only (no --token-file)
    p = kit.spawn(["client", f"127.0.0.1:{srv.server_addr[1]}", "-R", f"0:{local_of(echo)}"],
                  prefix=["env", f"CULVERT_TOKEN={kit.token}"])
    addr = p.exposed(1)[local_of(echo)]
    echo_once(addr, b"env token")


# --------------------------------------------------------------------------
# 3. replay and secrecy (plain transport: the protocol is visible)


@pytest.fixture
def recorded(kit):
    """A real plain-mode session recorded by a relay; one echo went through it."""
    echo = kit.echo()
    srv = kit.start_server("plain")
    relay = RecordingRelay(srv.server_addr)
    try:
        cli = kit.start_client(f"127.0.0.1:{relay.port}", [f"0:{local_of(echo)}"], "plain")
        addr = cli.exposed_map[local_of(echo)]
        for i in range(3):
            echo_once(addr, b"recorded payload %d" % i)
        srv.wait_stderr(r"connection closed", count=3)
        conns = relay.snapshot()
        yield srv, cli, conns, addr
    finally:
        relay.close()


def test_replay_recorded_control_bytes_rejected(kit, recorded):
    srv, cli, conns, _ = recorded
    controls = [c for c in conns if split_frames(c["c2s"])[:1] and split_frames(c["c2s"])[0][0] == HELLO]
    assert len(controls) == 1, f"expected one control connection, got {len(controls)} of {len(conns)}"
    c2s = controls[0]["c2s"]
    types = [t for t, _ in split_frames(c2s)]
    assert types[:2] == [HELLO, 0x03], f"unexpected client frames {types}"
    assert WELCOME in [t for t, _ in split_frames(controls[0]["s2c"])], "the real session was not welcomed"

    for attempt in range(2):
        with raw_connect(srv.server_addr) as s:
            port = s.getsockname()[1]
            s.sendall(c2s)
            frames, closed = frames_until_close(s, 5)
        got = [t for t, _ in frames]
        assert WELCOME not in got, f"replayed handshake was welcomed: {got}"
        assert got[:1] == [CHALLENGE], f"expected a fresh challenge first, got {got}"
        rest = frames[1:]
        if rest:
            assert rest[0][0] == REFUSED, f"after the challenge: {[t for t, _ in rest]}"
            n = struct.unpack(">H", rest[0][1][:2])[0]
            assert rest[0][1][2:2 + n] == b"authentication failed"
        assert closed, "server kept the replayed connection open"
        srv.wait_stderr(rf"authentication failed peer=127\.0\.0\.1:{port}\b", timeout=5)
    # the real session is unaffected
    assert cli.running()


def test_replay_recorded_data_channel_rejected(kit, recorded):
    srv, cli, conns, addr = recorded
    datas = [c for c in conns if split_frames(c["c2s"])[:1] and split_frames(c["c2s"])[0][0] == DATA_HELLO]
    # a channel the server used: its first frame pairs a visitor (connect) or makes it
    # a carrier of multiplexed streams (mux)
    used = [c for c in datas if [t for t, _ in split_frames(c["s2c"])[:1]] in ([CONNECT], [MUX])]
    assert used, f"no used data channel among {len(conns)} recorded connections"
    dh = split_frames(used[0]["c2s"])[0]
    with raw_connect(srv.server_addr) as s:
        s.sendall(struct.pack(">IB", len(dh[1]) + 1, DATA_HELLO) + dh[1])
        # visitors now must not be handed to the replayed channel
        echo_once(addr, b"after replay")
        closed, data = wait_closed_no_data(s, 5)
    assert closed, "server kept a replayed data channel open"
    assert data == b"", f"server sent {data[:40]!r} on a replayed data channel"


def test_fresh_server_nonce_per_connection(kit):
    srv = kit.start_server("plain")
    nonce = bytes(range(32))
    seen = []
    for _ in range(2):
        with raw_connect(srv.server_addr) as s:
            s.sendall(hello(nonce))
            f = read_frame(s, time.monotonic() + 5)
        assert f is not None and f[0] == CHALLENGE, f
        body = f[1]
        assert len(body) == 2 + 32 + 32 and body[:2] == struct.pack(">H", PROTOCOL_VERSION)
        seen.append(body[2:34])
        # the second connection's proof must differ because the server nonce does
    assert seen[0] != seen[1], "server reused its nonce for the same client nonce"


def test_old_version_hello_gets_refusal_in_the_old_layout(kit):
    """A version 3 client still reads why it was refused: Refused with only the reason
    string (version 3's layout, no refusal code after it), then the server closes."""
    srv = kit.start_server("plain")
    old = PROTOCOL_VERSION - 1
    with raw_connect(srv.server_addr) as s:
        port = s.getsockname()[1]
        s.sendall(hello(bytes(32), version=old))
        frames, closed = frames_until_close(s, 5)
    assert [t for t, _ in frames] == [REFUSED], frames
    body = frames[0][1]
    (n,) = struct.unpack(">H", body[:2])
    assert len(body) == 2 + n, f"refusal body has {len(body) - 2 - n} bytes after the reason: {body!r}"
    assert body[2:].decode() == f"unsupported protocol version {old}; this server speaks {PROTOCOL_VERSION}"
    assert closed, "server kept the connection open after refusing the version"
    srv.wait_stderr(rf"client refused: protocol version peer=127\.0\.0\.1:{port}\b.*version={old}", timeout=5)


def test_token_never_on_wire_plain(kit, recorded):
    _, _, conns, _ = recorded
    tok = kit.token.encode()
    forms = {
        "raw": tok,
        "hex": tok.hex().encode(),
        "HEX": tok.hex().upper().encode(),
        "b64": base64.b64encode(tok),
        "b64url": base64.urlsafe_b64encode(tok),
        "b64-nopad": base64.b64encode(tok).rstrip(b"="),
    }
    try:
        decoded = base64.urlsafe_b64decode(kit.token + "=" * (-len(kit.token) % 4))
        forms.update({"decoded": decoded, "decoded-hex": decoded.hex().encode(),
                      "decoded-b64": base64.b64encode(decoded).rstrip(b"=")})
    except ValueError:
        pass
    # also the middle 12 bytes of each (a partial leak)
    for name, f in list(forms.items()):
        if len(f) >= 24:
            forms[name + "-part"] = f[len(f) // 2 - 6:len(f) // 2 + 6]
    assert sum(len(c["c2s"]) + len(c["s2c"]) for c in conns) > 0
    for i, c in enumerate(conns):
        for direction in ("c2s", "s2c"):
            for name, f in forms.items():
                assert f not in c[direction], f"token ({name}) seen in connection {i} {direction}"


@pytest.mark.parametrize("tls_mode", ["tls-psk", "tls-cert"])
def test_tls_wire_is_encrypted(kit, tls_mode):
    echo = kit.echo()
    srv = kit.start_server(tls_mode)
    relay = RecordingRelay(srv.server_addr)
    try:
        cli = kit.start_client(f"{kit.server_host(tls_mode)}:{relay.port}", [f"0:{local_of(echo)}"], tls_mode)
        marker = b"culvert-plaintext-marker-" * 2000
        echo_once(cli.exposed_map[local_of(echo)], marker)
        srv.wait_stderr(r"connection closed", count=1)
        # pool channels may still be mid-handshake: wait until every one got answers
        conns = poll(lambda: (lambda cs: cs if all(c["c2s"] and c["s2c"] for c in cs) else None)(relay.snapshot()),
                     5, "every relayed connection to carry bytes both ways")
    finally:
        relay.close()
    assert len(conns) >= 2, f"expected control + data connections, got {len(conns)}"
    for i, c in enumerate(conns):
        # TLS handshake records both ways (content type 22, legacy version 3.x)
        assert c["c2s"][:2] == b"\x16\x03", f"connection {i} c2s does not start with a TLS record: {c['c2s'][:8]!r}"
        assert c["s2c"][:2] == b"\x16\x03", f"connection {i} s2c does not start with a TLS record: {c['s2c'][:8]!r}"
        for direction in ("c2s", "s2c"):
            assert b"culvert-plaintext-marker" not in c[direction], f"plaintext visible in connection {i} {direction}"
            assert kit.token.encode() not in c[direction]
            assert b"authentication failed" not in c[direction]


# --------------------------------------------------------------------------
# 4. hostile connections


def test_oversized_frame_closed_tunnel_survives(kit):
    echo = kit.echo()
    srv = kit.start_server("plain")
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], "plain")
    addr = cli.exposed_map[local_of(echo)]
    echo_once(addr, b"before")
    with raw_connect(srv.server_addr) as s:
        port = s.getsockname()[1]
        s.sendall(struct.pack(">IB", 1_000_000, HELLO) + b"\x00\x01")
        closed, data = wait_closed_no_data(s, 5)
    assert closed, "server kept a connection announcing a 1,000,000-byte frame"
    assert data == b""
    line = srv.wait_stderr(rf"handshake failed peer=127\.0\.0\.1:{port}\b", timeout=5)[0]
    assert "exceeds the limit" in line, line
    echo_once(addr, os.urandom(256 * 1024))
    assert cli.running()


@pytest.mark.parametrize("transport", ["tls", "plain"])
def test_silent_connection_times_out(kit, transport):
    srv = kit.start_server("plain" if transport == "plain" else "tls-psk", opts=["--handshake-timeout", "1s"])
    with raw_connect(srv.server_addr) as s:
        port = s.getsockname()[1]
        t0 = time.monotonic()
        closed, _ = wait_closed_no_data(s, 5)
        elapsed = time.monotonic() - t0
    assert closed and elapsed < 3.0, f"closed={closed} after {elapsed:.2f}s"
    assert elapsed > 0.5, f"closed after only {elapsed:.2f}s"
    srv.wait_stderr(rf"handshake failed peer=127\.0\.0\.1:{port}\b", timeout=3)


@pytest.mark.parametrize("transport", ["tls", "plain"])
def test_garbage_closed(kit, transport):
    echo = kit.echo()
    mode = "plain" if transport == "plain" else "tls-psk"
    # an incomplete TLS record is only closed by the handshake timeout
    srv = kit.start_server(mode, opts=["--handshake-timeout", "2s"])
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], mode)
    garbage = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), b"\x00\x00\x00\x05\x7f" + b"\x00" * 4,
               b"\x00\x00\x00\x00"]
    for g in garbage:
        with raw_connect(srv.server_addr) as s:
            port = s.getsockname()[1]
            s.sendall(g)
            closed, data = wait_closed_no_data(s, 5)
        assert closed, f"server kept a connection open after {g[:16]!r}"
        # TLS may answer with an alert, never with a protocol frame
        if transport == "plain":
            assert data == b"", data[:40]
        srv.wait_stderr(rf"(handshake failed|cannot set up connection) peer=127\.0\.0\.1:{port}\b", timeout=5)
    echo_once(cli.exposed_map[local_of(echo)], b"still fine")


def test_unauthenticated_limit(kit):
    echo = kit.echo()
    srv = kit.start_server("plain", opts=["--max-unauthenticated", "4", "--handshake-timeout", "3s"])
    before = settle_fd_count(srv.pid)
    idle = [raw_connect(srv.server_addr) for _ in range(4)]
    try:
        # the server's loops accept in parallel: wait until all four are in (one
        # descriptor each), so the fifth is the one over the limit
        poll(lambda: fd_count(srv.pid) >= before + 4, 5, "the four idle connections accepted")
        # a fifth one is turned away at once (the reset may even beat connect() back)
        try:
            fifth = raw_connect(srv.server_addr)
        except ConnectionResetError:
            closed = True
        else:
            with fifth:
                closed, _ = wait_closed_no_data(fifth, 2)
        assert closed, "fifth unauthenticated connection was not refused"
        srv.wait_stderr(r"too many unauthenticated", timeout=3)
    finally:
        for s in idle:
            s.close()
    # after the idle ones go, a real client gets in
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], "plain", opts=["--reconnect-max", "1s"])
    echo_once(cli.exposed_map[local_of(echo)], b"after the flood")


# --------------------------------------------------------------------------
# 5. crashes and reconnects


def test_server_kill9_restart_client_reconnects(kit):
    echo = kit.echo()
    sport = free_port()
    rport = free_port()
    srv = kit.start_server("tls-psk", port=sport)
    cli = kit.start_client(srv.server_addr, [f"{rport}:{local_of(echo)}"], "tls-psk",
                           opts=["--reconnect-max", "1s", "--heartbeat-interval", "1s", "--heartbeat-misses", "2"])
    addr = cli.exposed_map[local_of(echo)]
    assert addr == ("127.0.0.1", rport)
    echo_once(addr, b"before crash")
    srv.proc.send_signal(signal.SIGKILL)
    srv.wait_exit(5)
    poll(lambda: connect_refused(addr), 5, "exposed port to close with the server")
    cli.wait_stderr(r"control channel lost|server stopped answering|cannot reach server|reconnecting", timeout=10)
    assert cli.running()
    t0 = time.monotonic()
    srv2 = kit.start_server("tls-psk", port=sport)
    assert srv2.server_addr == ("127.0.0.1", sport)
    cli.wait_stderr(r"connected to server", count=2, timeout=10)

    def works():
        echo_once(addr, b"after restart", timeout=3)
        return True

    poll(works, 10, "the service to work again after the server restart", step=0.2)
    assert time.monotonic() - t0 < 12
    srv2.wait_stderr(rf"service exposed listen=127\.0\.0\.1:{rport}\b")
    assert cli.running()


def test_client_kill9_frees_port_then_reclaimed(kit):
    echo = kit.echo()
    rport = free_port()
    srv = kit.start_server("tls-psk", opts=["--heartbeat-interval", "1s", "--heartbeat-misses", "2"])
    cli = kit.start_client(srv.server_addr, [f"{rport}:{local_of(echo)}"], "tls-psk")
    addr = cli.exposed_map[local_of(echo)]
    echo_once(addr, b"first client")
    cli.proc.send_signal(signal.SIGKILL)
    cli.wait_exit(5)
    t0 = time.monotonic()
    poll(lambda: connect_refused(addr), 5, "the server to free the exposed port")
    freed_after = time.monotonic() - t0
    srv.wait_stderr(r"client disconnected", timeout=5)
    cli2 = kit.start_client(srv.server_addr, [f"{rport}:{local_of(echo)}"], "tls-psk")
    assert cli2.exposed_map[local_of(echo)] == addr
    echo_once(addr, b"second client")
    assert freed_after < 5


def test_heartbeat_frozen_client_frees_port_and_recovers(kit):
    """SIGSTOP leaves the TCP connections open: only heartbeats can tell."""
    echo = kit.echo()
    rport = free_port()
    srv = kit.start_server("tls-psk", opts=["--heartbeat-interval", "1s", "--heartbeat-misses", "2"])
    cli = kit.start_client(srv.server_addr, [f"{rport}:{local_of(echo)}"], "tls-psk",
                           opts=["--heartbeat-interval", "1s", "--heartbeat-misses", "2", "--reconnect-max", "1s"])
    addr = cli.exposed_map[local_of(echo)]
    echo_once(addr, b"alive")
    cli.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        srv.wait_stderr(r"client disconnected", timeout=8)
        poll(lambda: connect_refused(addr), 3, "the exposed port to be freed")
        assert time.monotonic() - t0 < 8
    finally:
        cli.send_signal(signal.SIGCONT)
    # the client notices, reconnects and gets its port back
    cli.wait_stderr(r"connected to server", count=2, timeout=10)

    def works():
        echo_once(addr, b"back", timeout=3)
        return True

    poll(works, 10, "the service to work again after SIGCONT", step=0.2)


def test_heartbeat_frozen_server_detected(kit):
    echo = kit.echo()
    srv = kit.start_server("tls-psk")
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], "tls-psk",
                           opts=["--heartbeat-interval", "1s", "--heartbeat-misses", "2", "--reconnect-max", "1s",
                                 "--handshake-timeout", "1s", "--connect-timeout", "1s"])
    echo_once(cli.exposed_map[local_of(echo)], b"alive")
    srv.send_signal(signal.SIGSTOP)
    try:
        cli.wait_stderr(r"server stopped answering", timeout=8)
        assert cli.running()
    finally:
        srv.send_signal(signal.SIGCONT)
    cli.wait_stderr(r"connected to server", count=2, timeout=15)
    assert cli.running()


def test_client_retries_when_tls_handshake_is_cut(kit):
    """A listener that accepts and closes at once (a crashing server, a proxy whose
    backend is down) is an unreachable server, not an authentication failure: the
    client must keep retrying, and connect once the real server is there."""
    port = free_port()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(16)
    stop = threading.Event()
    accepted = []

    def slam():
        while not stop.is_set():
            r, _, _ = select.select([lsock], [], [], 0.05)
            if r:
                c, _ = lsock.accept()
                accepted.append(1)
                c.close()

    t = threading.Thread(target=slam, daemon=True)
    t.start()
    echo = kit.echo()
    try:
        cli = kit.start_client(("127.0.0.1", port), [f"0:{local_of(echo)}"], "tls-psk",
                               opts=["--reconnect-max", "1s"], ready=False)
        poll(lambda: len(accepted) >= 3 or cli.proc.poll() is not None, 10, "three connection attempts")
        assert cli.running(), (
            f"client gave up after {len(accepted)} cut TLS handshake(s) (exit {cli.proc.returncode}) "
            f"instead of retrying\n{cli.describe()}")
        cli.wait_stderr(r"reconnecting", count=2, timeout=5)
    finally:
        stop.set()
        t.join(timeout=5)
        lsock.close()
    kit.start_server("tls-psk", port=port)
    addr = cli.exposed(1, timeout=10)[local_of(echo)]
    echo_once(addr, b"connected after all")


def test_sigterm_exits_zero(kit):
    echo = kit.echo()
    srv = kit.start_server("tls-psk")
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], "tls-psk")
    echo_once(cli.exposed_map[local_of(echo)], b"x")
    cli.send_signal(signal.SIGTERM)
    assert cli.wait_exit(10) == 0, cli.describe()
    srv.wait_stderr(r"client disconnected", timeout=5)
    srv.send_signal(signal.SIGTERM)
    assert srv.wait_exit(10) == 0, srv.describe()


# --------------------------------------------------------------------------
# 6./7. port conflicts and policy


def test_duplicate_remote_port_refused(kit):
    echo = kit.echo()
    rport = free_port()
    srv = kit.start_server("tls-psk")
    cli1 = kit.start_client(srv.server_addr, [f"{rport}:{local_of(echo)}"], "tls-psk")
    cli2 = kit.start_client(srv.server_addr, [f"{rport}:{local_of(echo)}"], "tls-psk", ready=False)
    rc = cli2.wait_exit(10)
    assert rc == 1, cli2.describe()
    err = cli2.stderr_text()
    assert re.search(rf"server refused service .*{rport}.*in use", err), err
    srv.wait_stderr(r"service refused .*reason=", timeout=5)
    echo_once(cli1.exposed_map[local_of(echo)], b"first still works")


def test_port_policy_not_allowed(kit):
    lo = free_port()
    srv = kit.start_server("tls-psk", opts=["--allow-ports", f"{lo}-{lo}"])
    outside = lo - 1 if lo > 30000 else lo + 1
    cli = kit.start_client(srv.server_addr, [f"{outside}:127.0.0.1:9"], "tls-psk", ready=False)
    assert cli.wait_exit(10) == 1, cli.describe()
    assert "not allowed" in cli.stderr_text(), cli.describe()
    assert connect_refused(("127.0.0.1", outside))
    line = srv.wait_stderr(rf"service refused .*port={outside}\b", timeout=5)[0]
    assert "not allowed" in line, line


def test_port_zero_stays_in_allowed_range(kit):
    lo = free_port()
    echo = kit.echo()
    srv = kit.start_server("tls-psk", opts=["--allow-ports", f"{lo}-{lo}"])
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}"], "tls-psk")
    assert cli.exposed_map[local_of(echo)] == ("127.0.0.1", lo)
    echo_once(("127.0.0.1", lo), b"picked from the range")


# --------------------------------------------------------------------------
# 8. no leaks


def test_no_close_wait_and_fd_levels(kit):
    echo = kit.echo()
    closer = kit.local(CloseFirstServer())
    srv = kit.start_server("tls-psk")
    cli = kit.start_client(srv.server_addr, [f"0:{local_of(echo)}", f"0:{local_of(closer)}"], "tls-psk",
                           opts=["--pool", "2"])
    a_echo = cli.exposed_map[local_of(echo)]
    a_close = cli.exposed_map[local_of(closer)]
    # warm the pool, then measure the idle level
    echo_once(a_echo, b"warm")
    srv.wait_stderr(r"connection closed", count=1)
    idle = {"server": settle_fd_count(srv.pid), "client": settle_fd_count(cli.pid)}

    def visitor_first(i):
        with socket.create_connection(a_echo, timeout=10) as s:
            s.sendall(b"v%d" % i)
            recv_exactly(s, len(b"v%d" % i))
        # close both directions at once, without waiting for the echo side

    def local_first(i):
        with socket.create_connection(a_close, timeout=10) as s:
            assert recv_all(s, 16) == b"bye\n"

    def visitor_reset(i):
        s = socket.create_connection(a_echo, timeout=10)
        s.sendall(b"r%d" % i)
        recv_exactly(s, len(b"r%d" % i))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    kinds = [visitor_first, local_first, visitor_reset]
    errors = []
    lock = threading.Lock()

    def worker(start):
        for i in range(start, 200, 8):
            try:
                kinds[i % 3](i)
            except (OSError, AssertionError) as e:
                with lock:
                    errors.append(f"{kinds[i % 3].__name__} {i}: {e!r}")

    run_threads([threading.Thread(target=worker, args=(k,), daemon=True) for k in range(8)],
                time.monotonic() + 60)
    assert not errors, errors[:5]
    srv.wait_stderr(r"connection closed", count=201, timeout=20)
    cli.wait_stderr(r"connection closed", count=201, timeout=20)

    pids = {srv.pid: "server", cli.pid: "client"}
    last = {}

    def clean():
        cw = close_wait_pids()
        last["cw"] = {pids[p]: n for p, n in cw.items() if p in pids}
        last["fds"] = {"server": fd_count(srv.pid), "client": fd_count(cli.pid)}
        return not last["cw"] and last["fds"] == idle

    try:
        poll(clean, 15, "no CLOSE_WAIT and fd counts back at idle", step=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}; idle={idle} last={last}\n"
                             f"ls -l server fds: {sorted(os.readlink(f'/proc/{srv.pid}/fd/{f}') for f in os.listdir(f'/proc/{srv.pid}/fd'))}")
    assert srv.running() and cli.running()
