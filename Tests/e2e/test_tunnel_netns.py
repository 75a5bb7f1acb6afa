"""The tunnel through a real NAT, built from network namespaces made by this test
(netns_support.py's topology).

    cv-vis  (10.200.1.3) --+
                           +-- br0 in cv-pub (server, 10.200.1.1)
    cv-rtr wan0 (10.200.1.2) --+
    cv-rtr lan0 (10.200.2.1)  masquerade out of wan0, no new connections in
    cv-priv (10.200.2.2, default via 10.200.2.1): culvert client + echo service

Every link lives inside these namespaces (veths are created directly in them), so
no traffic can reach the host's network.  Needs root, `ip netns` and `nft`.
"""

from __future__ import annotations

import json
import os
import select
import sys
import textwrap

from netns_support import PRIV_IP, PUB_IP, RTR_WAN_IP, SERVER_PORT, SERVICE_PORT, VIS_IP, Topology
from tunnel_support import new_token

ECHO_SERVER = textwrap.dedent("""
    import socket, sys, threading
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
    print("ready", flush=True)
    def serve(c):
        c.settimeout(60)
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)
            c.shutdown(socket.SHUT_WR)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")

VISITOR = textwrap.dedent("""
    import hashlib, json, os, socket, sys, threading
    host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out = {}
    try:
        s = socket.create_connection((host, port), timeout=float(sys.argv[4]))
    except OSError as e:
        print(json.dumps({"connected": False, "error": repr(e)})); sys.exit(0)
    data = os.urandom(size)
    def send():
        s.sendall(data); s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send); t.start()
    h = hashlib.sha256(); n = 0
    while True:
        d = s.recv(65536)
        if not d:
            break
        h.update(d); n += len(d)
    t.join()
    print(json.dumps({"connected": True, "ok": n == size and h.digest() == hashlib.sha256(data).digest(), "n": n}))
""")


def visit(topo: Topology, ns: str, host: str, port: int, size: int, connect_timeout: float = 5) -> dict:
    r = topo.python(ns, VISITOR, host, str(port), str(size), str(connect_timeout), timeout=connect_timeout + 30)
    assert r.returncode == 0, f"visitor in {ns} failed: {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_tunnel_through_nat(topo, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(new_token() + "\n")
    os.chmod(token_file, 0o600)

    echo = topo.popen("priv", [sys.executable, "-c", ECHO_SERVER, str(SERVICE_PORT)])
    ready, _, _ = select.select([echo.stdout], [], [], 10)
    assert ready and echo.stdout.readline().strip() == "ready", f"echo service in priv did not start (rc={echo.poll()})"

    # control: the echo service answers on its private address from the router
    r = visit(topo, "rtr", PRIV_IP, SERVICE_PORT, 4096)
    assert r.get("ok"), f"private service not reachable from inside the NAT: {r}"

    server = topo.culvert("pub", ["server", "--listen", f"{PUB_IP}:{SERVER_PORT}", "--bind-addr", PUB_IP,
                                  "--token-file", str(token_file)])
    assert server.listen_addrs(1) == [(PUB_IP, SERVER_PORT)]
    client = topo.culvert("priv", ["client", f"{PUB_IP}:{SERVER_PORT}", "-R", f"0:127.0.0.1:{SERVICE_PORT}",
                                   "--token-file", str(token_file)])
    exposed = client.exposed(1, timeout=20)[f"127.0.0.1:{SERVICE_PORT}"]
    assert exposed[0] == PUB_IP and exposed[1] != 0

    # the server sees the client from the router's public address (masquerade works)
    line = server.wait_stderr(r"client connected peer=", timeout=5)[0]
    assert f"peer={RTR_WAN_IP}:" in line, line

    # the visitor on the public side reaches the service through the tunnel
    for size in (1, 1024 * 1024):
        r = visit(topo, "vis", PUB_IP, exposed[1], size)
        assert r.get("ok"), f"echo through the tunnel failed: {r}"
    server.wait_stderr(rf"connection closed .*peer={VIS_IP}:", timeout=5)

    # ... but cannot reach the private service directly
    r = visit(topo, "vis", PRIV_IP, SERVICE_PORT, 16, connect_timeout=2)
    assert not r.get("connected"), f"visitor reached the private service directly: {r}"
