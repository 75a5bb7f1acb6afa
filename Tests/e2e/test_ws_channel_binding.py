"""wss channel binding (`--inner auto`, the default): the token's TLS-PSK inside the
WebSocket is left out only when both ends prove, with the token, that they share one
outer TLS session.  Straight to the server the proofs check and both ends log
`inner=bound`; through an nginx that ends the outer TLS and opens its own to the server
(as a CDN re-encrypting to the origin does, passing every header both ways) they cannot,
and both ends keep `inner=tls`.  A forged proof in the server's answer is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from conftest import MiB
from tunnel_support import TunnelKit, assert_echoed, run_cli
from ws_support import read_head, ws_client

CONNECTED = r"connected to server .*inner=(\w+)"
ACCEPTED = r"client connected .*inner=(\w+)"


def start_server(kit: TunnelKit, transport: str, opts=()):
    args = ["--transport", transport, "--ws-path", "/tunnel", "--threads", "2", *opts]
    if transport == "wss":
        args += ["--cert", kit.certs.cert, "--key", kit.certs.key]
    return kit.start_server("tls-psk", args)


def inner_layers(server, client) -> tuple[str, str]:
    """What each end logged as the layer inside the WebSocket of the control channel."""
    seen_by_client = re.search(CONNECTED, client.wait_stderr(CONNECTED)[0]).group(1)
    seen_by_server = re.search(ACCEPTED, server.wait_stderr(ACCEPTED)[0]).group(1)
    return seen_by_server, seen_by_client


def check_echo(client) -> None:
    (addr,) = client.exposed_map.values()
    assert_echoed(addr, [os.urandom(4 * MiB), os.urandom(100_000), b"x"], timeout=30)


@pytest.mark.parametrize("mux", [[], ["--mux", "0"]], ids=["mux", "dedicated"])
def test_straight_wss_binds_and_leaves_the_inner_tls_out(kit, mux):
    server = start_server(kit, "wss")
    port = server.server_addr[1]
    client = ws_client(kit, f"wss://localhost:{port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                       opts=["--ca", kit.certs.ca, *mux])
    assert inner_layers(server, client) == ("bound", "bound")
    check_echo(client)
    assert server.count_stderr("error") == 0, server.describe()


def test_through_a_tls_terminating_proxy_the_inner_tls_stays(kit, nginx):
    server = start_server(kit, "wss")
    edge = nginx(server.server_addr[1], upstream_tls=True)
    client = ws_client(kit, f"wss://localhost:{edge.port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                       opts=["--ca", kit.certs.ca])
    # nginx passed the client's proof to the server and would pass an answer back, but the
    # proof covers the client's session with nginx, not nginx's session with the server.
    assert inner_layers(server, client) == ("tls", "tls")
    check_echo(client)


@pytest.mark.parametrize("server_opts,client_opts,expected", [
    ([], ["--inner", "tls"], ("tls", "tls")),
    (["--inner", "tls"], [], ("tls", "tls")),
    (["--inner", "plain"], [], ("plain", "bound")),
], ids=["client-forces-tls", "server-forces-tls", "plain-server"])
def test_either_end_decides_for_the_inner_tls(kit, server_opts, client_opts, expected):
    server = start_server(kit, "wss", server_opts)
    port = server.server_addr[1]
    client = ws_client(kit, f"wss://localhost:{port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                       opts=["--ca", kit.certs.ca, *client_opts])
    assert inner_layers(server, client) == expected
    check_echo(client)


def test_binding_holds_through_a_connect_proxy(kit, http_proxy):
    """CONNECT passes the TLS through untouched, so the two ends still share one session."""
    server = start_server(kit, "wss")
    port = server.server_addr[1]
    client = ws_client(kit, f"wss://localhost:{port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"],
                       opts=["--ca", kit.certs.ca, "--proxy", f"http://alice:s3cret@127.0.0.1:{http_proxy}"])
    assert inner_layers(server, client) == ("bound", "bound")
    check_echo(client)


@pytest.mark.parametrize("server_inner,client_inner,behind_nginx,says", [
    ("plain", "auto", True, "the server runs --inner plain and the proof that would let this client "
                            "leave its TLS-PSK out did not check"),
    ("plain", "tls", False, "the server runs --inner plain and this client keeps the token's TLS-PSK"),
    ("auto", "plain", False, "the server keeps the token's TLS-PSK inside the WebSocket and this client "
                             "runs --inner plain"),
], ids=["plain-server-behind-proxy", "plain-server-tls-client", "plain-client"])
def test_ends_that_disagree_stop_the_client_with_both_settings_named(kit, nginx, server_inner, client_inner,
                                                                     behind_nginx, says):
    server = start_server(kit, "wss", ["--inner", server_inner])
    port = server.server_addr[1]
    if behind_nginx:
        port = nginx(port, upstream_tls=True).port
    client = ws_client(kit, f"wss://localhost:{port}/tunnel", ["127.0.0.1:0:127.0.0.1:9"],
                       opts=["--ca", kit.certs.ca, "--inner", client_inner], ready=False)
    assert client.wait_exit(15) == 1
    assert says in client.stderr_text(), client.describe()
    assert "give both ends the same --inner" in client.stderr_text()


def test_reserved_binding_headers_are_refused_in_header(kit):
    for name in ("Culvert-Channel-Binding", "culvert-inner"):
        r = run_cli(["client", "wss://localhost:1/tunnel", "-R", "0:127.0.0.1:9", "--token-file", kit.token_file,
                     "--header", f"{name}: x"])
        assert r.returncode == 2, r.stderr
        assert f"--header '{name}' is set by the upgrade itself" in r.stderr, r.stderr


OPENSSL = shutil.which("openssl")


class OpenSSLClient:
    """`openssl s_client` on a wss server, which prints the session's RFC 9266 exporter
    (`-keymatexport EXPORTER-Channel-Binding`): an implementation of the exporter we did
    not write, for proofs made here from PROTOCOL.md alone."""

    def __init__(self, port: int, ca: str):
        self.proc = subprocess.Popen(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-CAfile", ca,
             "-tls1_3", "-keymatexport", "EXPORTER-Channel-Binding", "-keymatexportlen", "32", "-ign_eof"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buffered = b""
        found = self.read_until(rb"Keying material: *([0-9A-Fa-f]{64})")
        assert found, self.buffered[-500:]
        self.session = bytes.fromhex(found.group(1).decode())

    def read_until(self, pattern: bytes, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.buffered)
            if found:
                return found
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self.buffered += chunk
        return None

    def upgrade(self, claim: str) -> str:
        self.proc.stdin.write(("GET /tunnel HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                               f"Sec-WebSocket-Version: 13\r\nCulvert-Channel-Binding: {claim}\r\n\r\n").encode())
        self.proc.stdin.flush()
        found = self.read_until(rb"HTTP/1\.1 101[^\r]*\r\n(?:[^\r]+\r\n)*\r\n")
        assert found, self.buffered[-500:]
        return found.group(0).decode()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def proof(token: str, signer: str, session: bytes) -> str:
    """The proof of PROTOCOL.md, computed with Python's own HKDF and HMAC."""
    prk = hmac.new(bytes(32), token.encode(), hashlib.sha256).digest()
    key = hmac.new(prk, b"culvert/1 ws channel binding\x01", hashlib.sha256).digest()
    return base64.b64encode(hmac.new(key, f"culvert/1 {signer} binding".encode() + session,
                                     hashlib.sha256).digest()).decode()


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_proofs_made_from_the_spec_over_openssl_sessions(kit):
    """A fresh proof gets the server's; one replayed from another session, or made with the
    server's label (a reflection), gets a plain 101 that says the TLS-PSK stays."""
    server = start_server(kit, "wss")
    port = server.server_addr[1]
    first = OpenSSLClient(port, kit.certs.ca)
    try:
        answer = first.upgrade(proof(kit.token, "client", first.session))
        got = re.search(r"(?i)culvert-channel-binding: *(\S+)", answer)
        assert got and got.group(1) == proof(kit.token, "server", first.session), answer
    finally:
        first.close()
    for claim_for in (lambda s: proof(kit.token, "client", first.session), lambda s: proof(kit.token, "server", s)):
        other = OpenSSLClient(port, kit.certs.ca)
        try:
            assert other.session != first.session
            answer = other.upgrade(claim_for(other.session))
            assert not re.search(r"(?i)culvert-channel-binding", answer), answer
            assert re.search(r"(?i)culvert-inner: *tls", answer), answer
        finally:
            other.close()


def test_plain_ws_never_binds(kit):
    server = start_server(kit, "ws")
    port = server.server_addr[1]
    client = ws_client(kit, f"ws://127.0.0.1:{port}/tunnel", [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"])
    assert inner_layers(server, client) == ("tls", "tls")
    check_echo(client)


class ForgingEdge:
    """A TLS endpoint with the kit's certificate that answers every upgrade with 101 and a
    made-up channel binding proof, and records the requests."""

    def __init__(self, certs):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(certs.cert, certs.key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.stop = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop and len(self.requests) < 20:
            try:
                raw, _ = self.sock.accept()
            except socket.timeout:
                continue
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as s:
                    s.settimeout(5)
                    head = read_head(s)
                    self.requests.append(head)
                    key = re.search(rb"(?i)sec-websocket-key: *(\S+)", head).group(1)
                    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
                    forged = base64.b64encode(os.urandom(32))
                    s.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Accept: " + accept + b"\r\nCulvert-Channel-Binding: " + forged + b"\r\n\r\n")
                    s.recv(4096)
            except (OSError, AttributeError):
                pass

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        self.sock.close()


def test_a_client_on_inner_tls_sends_no_proof_and_ignores_one(kit):
    edge = ForgingEdge(kit.certs)
    try:
        client = ws_client(kit, f"wss://localhost:{edge.port}/tunnel", ["127.0.0.1:0:127.0.0.1:9"],
                           opts=["--ca", kit.certs.ca, "--inner", "tls"], ready=False)
        line = client.wait_stderr("cannot reach server", timeout=15)[0]
        assert "channel binding" not in line, line  # it went on to its TLS-PSK, which the edge cannot speak
        assert edge.requests and not any(b"culvert-channel-binding" in r.lower() for r in edge.requests)
    finally:
        edge.close()


def test_a_forged_server_proof_is_refused(kit):
    edge = ForgingEdge(kit.certs)
    try:
        client = ws_client(kit, f"wss://localhost:{edge.port}/tunnel", ["127.0.0.1:0:127.0.0.1:9"],
                           opts=["--ca", kit.certs.ca], ready=False)
        line = client.wait_stderr("cannot reach server", timeout=15)[0]
        assert "channel binding proof does not match" in line, line
        assert client.count_stderr("connected to server") == 0
        # The client sent its own proof: base64 of 32 bytes.
        proofs = [re.search(rb"(?i)culvert-channel-binding: *(\S+)", r) for r in edge.requests]
        assert proofs and all(p and len(base64.b64decode(p.group(1))) == 32 for p in proofs), edge.requests
    finally:
        edge.close()
