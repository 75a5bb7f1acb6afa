"""The NAT topology of the netns end-to-end tests, built from network namespaces made
per test (random names), and its fixture `topo` (reaching every test through
`pytest_plugins` in conftest.py):

    cv-vis  (10.200.1.3) --+
                           +-- br0 in cv-pub (server, 10.200.1.1)
    cv-rtr wan0 (10.200.1.2) --+
    cv-rtr lan0 (10.200.2.1)  masquerade out of wan0, no new connections in
    cv-priv (10.200.2.2, default via 10.200.2.1)

Every link lives inside these namespaces (veths are created directly in them), so
no traffic can reach the host's network.  Needs root, `ip netns` and `nft`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import textwrap

import pytest

from tunnel_support import TunnelProc, wait_for_binary

PUB_IP, RTR_WAN_IP, VIS_IP = "10.200.1.1", "10.200.1.2", "10.200.1.3"
RTR_LAN_IP, PRIV_IP = "10.200.2.1", "10.200.2.2"
SERVER_PORT, SERVICE_PORT = 7000, 8080


def sh(*args: str, input: str | None = None, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def ensure_nft() -> str:
    """`nft` path; installs the nftables package once if missing, else skips."""
    path = shutil.which("nft")
    if path:
        return path
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("nft missing and cannot install nftables")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nftables"],
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nftables"]):
        try:
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=240)
        except subprocess.TimeoutExpired:
            break
        path = shutil.which("nft") or (os.path.exists("/usr/sbin/nft") and "/usr/sbin/nft")
        if path:
            return path
    pytest.skip("nft missing and `apt-get install nftables` failed")


class Topology:
    """One test's namespaces, links and NAT rules and what runs in them; teardown()
    removes them all."""

    def __init__(self):
        suffix = secrets.token_hex(3)
        self.ns = {k: f"cv-{k}-{suffix}" for k in ("pub", "rtr", "priv", "vis")}
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.culverts: list[TunnelProc] = []

    def ip(self, ns: str, *args: str) -> None:
        sh("ip", "-n", self.ns[ns], *args)

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[ns]]

    def build(self, nft: str) -> None:
        for name in self.ns.values():
            r = sh("ip", "netns", "add", name, check=False)
            if r.returncode != 0:
                if not self.created:
                    pytest.skip(f"cannot create network namespaces: {r.stderr.strip()}")
                raise AssertionError(f"ip netns add {name}: {r.stderr.strip()}")
            self.created.append(name)
        for k in self.ns:
            self.ip(k, "link", "set", "lo", "up")
        # public segment: a bridge in pub, the router's wan0 and the visitor on it
        self.ip("pub", "link", "add", "br0", "type", "bridge")
        self.ip("pub", "link", "add", "p-rtr", "type", "veth", "peer", "name", "wan0", "netns", self.ns["rtr"])
        self.ip("pub", "link", "add", "p-vis", "type", "veth", "peer", "name", "eth0", "netns", self.ns["vis"])
        for port in ("p-rtr", "p-vis"):
            self.ip("pub", "link", "set", port, "master", "br0")
            self.ip("pub", "link", "set", port, "up")
        self.ip("pub", "addr", "add", f"{PUB_IP}/24", "dev", "br0")
        self.ip("pub", "link", "set", "br0", "up")
        self.ip("rtr", "addr", "add", f"{RTR_WAN_IP}/24", "dev", "wan0")
        self.ip("rtr", "link", "set", "wan0", "up")
        self.ip("vis", "addr", "add", f"{VIS_IP}/24", "dev", "eth0")
        self.ip("vis", "link", "set", "eth0", "up")
        # The visitor even has a route to the private net via the router: only NAT stops it.
        self.ip("vis", "route", "add", "10.200.2.0/24", "via", RTR_WAN_IP)
        # private segment
        self.ip("rtr", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", self.ns["priv"])
        self.ip("rtr", "addr", "add", f"{RTR_LAN_IP}/24", "dev", "lan0")
        self.ip("rtr", "link", "set", "lan0", "up")
        self.ip("priv", "addr", "add", f"{PRIV_IP}/24", "dev", "eth0")
        self.ip("priv", "link", "set", "eth0", "up")
        self.ip("priv", "route", "add", "default", "via", RTR_LAN_IP)
        # the router: forwarding, masquerade out of wan0, no new connections in
        sh(*self.exec_prefix("rtr"), "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        rules = textwrap.dedent("""\
            table ip nat {
                chain postrouting {
                    type nat hook postrouting priority 100;
                    oifname "wan0" masquerade
                }
            }
            table ip filter {
                chain forward {
                    type filter hook forward priority 0; policy drop;
                    ct state established,related accept
                    iifname "lan0" oifname "wan0" accept
                }
            }
            """)
        sh(*self.exec_prefix("rtr"), nft, "-f", "-", input=rules)

    def popen(self, ns: str, argv: list[str]) -> subprocess.Popen:
        p = subprocess.Popen([*self.exec_prefix(ns), *argv], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def python(self, ns: str, code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return sh(*self.exec_prefix(ns), sys.executable, "-c", code, *args, timeout=timeout, check=False)

    def culvert(self, ns: str, args: list[str]) -> TunnelProc:
        p = TunnelProc(wait_for_binary(), args, prefix=self.exec_prefix(ns))
        self.culverts.append(p)
        return p

    def teardown(self) -> None:
        for c in self.culverts:
            try:
                c.kill()
                print(c.describe(tail=30))
            except Exception as exc:  # keep tearing down
                print(f"kill {c.pid}: {exc!r}")
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=5)
            except Exception:
                pass
        for name in reversed(self.created):
            # no process of ours is left inside; deleting the name frees the namespace
            sh("ip", "netns", "del", name, check=False)
        self.created.clear()


@pytest.fixture
def topo():
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) not available")
    nft = ensure_nft()
    t = Topology()
    try:
        t.build(nft)
        yield t
    finally:
        t.teardown()
