"""The ws/wss client's options beyond the URL (issue 15): `--proxy socks5://` and
`--proxy env` (HTTPS_PROXY and NO_PROXY read only when asked), `--sni` for a wss server
dialed by another name, `--fingerprint` instead of a CA, and the system CA store by default."""

from __future__ import annotations

import os

from conftest import MiB
from tunnel_support import assert_echoed, poll
from ws_support import ws_client, ws_server

PROXY_AUTH_ERROR = "refused the user name or password given in --proxy"


def service(kit) -> list[str]:
    return [f"127.0.0.1:0:127.0.0.1:{kit.echo().port}"]


def test_through_a_socks5_proxy_with_a_password(kit, http_proxy):
    _, port = ws_server(kit, "ws")
    client = ws_client(kit, f"ws://127.0.0.1:{port}/tunnel", service(kit),
                       opts=["--proxy", f"socks5://alice:s3cret@127.0.0.1:{http_proxy}"])
    (addr,) = client.exposed_map.values()
    assert_echoed(addr, [os.urandom(2 * MiB)], timeout=30)


def test_proxy_env_reads_https_proxy_and_no_proxy_only_when_asked(kit, http_proxy, monkeypatch):
    _, port = ws_server(kit, "ws")
    url = f"ws://127.0.0.1:{port}/tunnel"
    monkeypatch.setenv("HTTPS_PROXY", f"http://alice:wrong@127.0.0.1:{http_proxy}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    ignored = ws_client(kit, url, service(kit))
    assert_echoed(next(iter(ignored.exposed_map.values())), [os.urandom(64 * 1024)], timeout=15)

    used = ws_client(kit, url, service(kit), opts=["--proxy", "env"], ready=False)
    assert used.wait_exit_code(15) == 1, "the environment's proxy was used, and refused its password"
    assert PROXY_AUTH_ERROR in used.stderr_text()

    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    exempt = ws_client(kit, url, service(kit), opts=["--proxy", "env"])
    assert_echoed(next(iter(exempt.exposed_map.values())), [os.urandom(64 * 1024)], timeout=15)


def test_wss_by_address_with_sni_or_a_pinned_fingerprint(kit):
    _, port = ws_server(kit, "wss")
    url = f"wss://127.0.0.1:{port}/tunnel"
    named = ws_client(kit, url, service(kit), opts=["--ca", kit.certs.ca, "--sni", "localhost"])
    assert_echoed(next(iter(named.exposed_map.values())), [os.urandom(1 * MiB)], timeout=30)

    pinned = ws_client(kit, url, service(kit), opts=["--fingerprint", kit.certs.fingerprint])
    assert_echoed(next(iter(pinned.exposed_map.values())), [os.urandom(1 * MiB)], timeout=30)

    # The name --sni gives is the one checked: the certificate holds localhost and 127.0.0.1.
    other = ws_client(kit, url, service(kit), opts=["--ca", kit.certs.ca, "--sni", "other.example"], ready=False)
    poll(lambda: "--sni NAME" in other.stderr_text(), 15, "the certificate error naming --sni")
    # By default the system CA store decides, which does not know the test's CA.
    system = ws_client(kit, f"wss://localhost:{port}/tunnel", service(kit), ready=False)
    poll(lambda: "--ca FILE" in system.stderr_text(), 15, "the certificate error of the system store")
    assert "exposed" not in "\n".join(system.stdout_lines)
