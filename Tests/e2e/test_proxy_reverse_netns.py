"""The reverse proxy through a real NAT (issue 14, "`-R proxy:` ... in the netns NAT
topology"): the client in the private namespace exposes `-R proxy:` on the server's
public address; curl on the public side, through that port, fetches a page from an HTTP
server only the private namespace can see (bound to its loopback, named `localhost`,
which the client resolves). The topology is netns_support.py's: namespaces made by
the test (random names), root, `ip netns` and `nft`.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import subprocess
import sys
import textwrap

from netns_support import PUB_IP, SERVER_PORT
from tunnel_support import new_token

PAGE_PORT = 8081

HTTP_SERVER = textwrap.dedent("""
    import http.server, sys
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Quiet)
    print("ready", flush=True)
    server.serve_forever()
""")


def curl(topo, ns: str, url: str, proxy: str | None, user: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    args = ["curl", "-sS", "--max-time", "10", "-o", "-", url]
    if proxy:
        args += ["--socks5-hostname", proxy]
    if user:
        args += ["--proxy-user", user]
    return subprocess.run([*topo.exec_prefix(ns), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


def test_reverse_proxy_reaches_a_service_only_the_private_namespace_sees(topo, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(new_token() + "\n")
    os.chmod(token_file, 0o600)
    auth = tmp_path / "users"
    auth.write_text("alice:s3cret\n")
    os.chmod(auth, 0o600)
    site = tmp_path / "site"
    site.mkdir()
    page = os.urandom(3 << 20)
    (site / "blob").write_bytes(page)

    http = subprocess.Popen([*topo.exec_prefix("priv"), sys.executable, "-c", HTTP_SERVER, str(PAGE_PORT)],
                            cwd=site, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    topo.procs.append(http)
    ready, _, _ = select.select([http.stdout], [], [], 10)
    assert ready and http.stdout.readline().strip() == "ready", f"HTTP server in priv did not start (rc={http.poll()})"

    server = topo.culvert("pub", ["server", "--listen", f"{PUB_IP}:{SERVER_PORT}", "--bind-addr", PUB_IP,
                                  "--token-file", str(token_file)])
    assert server.listen_addrs(1) == [(PUB_IP, SERVER_PORT)]
    client = topo.culvert("priv", ["client", f"{PUB_IP}:{SERVER_PORT}", "-R", f"proxy:{PUB_IP}:0",
                                   "--proxy-auth-file", str(auth), "--token-file", str(token_file)])
    line = client.wait_stdout(re.compile(r"^exposed proxy (\S+)$"), timeout=20)[0]
    proxy = line.group(1)
    assert proxy.startswith(f"{PUB_IP}:"), proxy

    # The page is there for the private namespace only: not even its address answers
    # from the public side.
    direct = curl(topo, "vis", f"http://{PUB_IP}:{PAGE_PORT}/blob", None)
    assert direct.returncode != 0

    fetched = curl(topo, "vis", f"http://localhost:{PAGE_PORT}/blob", proxy, user="alice:s3cret")
    assert fetched.returncode == 0, fetched.stderr
    assert hashlib.sha256(fetched.stdout).hexdigest() == hashlib.sha256(page).hexdigest()
    client.wait_stderr(r"connection closed .*destination=localhost:8081", timeout=5)

    refused = curl(topo, "vis", f"http://localhost:{PAGE_PORT}/blob", proxy, user="alice:wrong")
    assert refused.returncode != 0 and not refused.stdout
