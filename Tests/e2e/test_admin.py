"""The admin endpoint (`--admin`), its metrics checked against the traffic the tests
send, and the systemd notifications (`NOTIFY_SOCKET`).

Metrics are parsed with prometheus_client's own text parser, not ours.  Everything
listens on loopback; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Culvert, EchoServer, REPO_ROOT, connect, connect_expect_closed, parse_addr, recv_exactly, run_culvert
from tunnel_support import UdpServer, local_of, new_token, poll

ADMIN_RE = re.compile(r"^listening admin (\S+)$")
TCP_RE = re.compile(r"^listening tcp (\S+) -> \S+$")
UDP_RE = re.compile(r"^listening udp (\S+) -> \S+$")


def admin_url(proc: Culvert) -> str:
    host, port = parse_addr(proc.wait_stdout(ADMIN_RE)[0].group(1))
    return f"http://{host}:{port}"


def get(url: str, token: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read().decode()


def scrape(base: str, token: str | None = None) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} for every sample of /metrics."""
    status, content_type, body = get(base + "/metrics", token)
    assert status == 200, body
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def start(path: str, args: list[str], ready: re.Pattern, count: int = 1) -> Culvert:
    proc = Culvert(path, args)
    proc.wait_stdout(ready, count)
    proc.wait_stdout(ADMIN_RE)
    return proc


@pytest.fixture
def procs():
    started: list[Culvert] = []
    yield started
    for p in started:
        p.kill()
        print(p.describe(tail=40))


def test_forward_tcp_metrics_count_every_connection_and_byte(culvert_path, servers, procs):
    echo = servers(EchoServer())
    fwd = start(culvert_path, ["forward", "tcp", "0", f"127.0.0.1:{echo.port}", "--admin", "0"], TCP_RE)
    procs.append(fwd)
    listen = parse_addr(fwd.wait_stdout(TCP_RE)[0].group(1))
    base = admin_url(fwd)
    sizes = [1, 1000, 65536, 300_000, 4096]
    for i, size in enumerate(sizes):
        payload = bytes([i + 1]) * size
        with connect(listen) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert recv_exactly(s, size) == payload
            assert s.recv(1) == b""

    service = f"127.0.0.1:{listen[1]}"
    samples = poll(lambda: (m := scrape(base)) and total(m, "culvert_connections_total", service=service) == 5 and m,
                   10, "five ended connections in the metrics")
    assert value(samples, "culvert_connections_total", service=service, result="eof") == 5
    assert value(samples, "culvert_connections_active", service=service) == 0
    assert value(samples, "culvert_transfer_bytes_total", service=service, direction="up") == sum(sizes)
    assert value(samples, "culvert_transfer_bytes_total", service=service, direction="down") == sum(sizes)
    assert value(samples, "culvert_connect_duration_seconds_count") == 5
    assert value(samples, "culvert_connect_duration_seconds_bucket", le="+Inf") == 5
    assert value(samples, "culvert_build_info", version="0.1.0", command="forward tcp") == 1
    assert value(samples, "culvert_config_reloads_total", result="applied") == 0
    assert value(samples, "culvert_tunnel_sessions") == 0

    status, content_type, body = get(base + "/status")
    assert status == 200 and content_type == "application/json"
    report = json.loads(body)
    assert report["command"] == "forward tcp"
    assert report["config_generation"] == 1
    assert report["uptime_seconds"] >= 0
    assert report["connections"] == {"active": 0, "total": 5}
    assert report["bytes"] == {"up": sum(sizes), "down": sum(sizes)}
    assert report["services"] == [{
        "name": service, "kind": "tcp", "ports": [service], "connections_active": 0,
        "connections_total": 5, "bytes_up": sum(sizes), "bytes_down": sum(sizes),
    }]


def test_running_connection_bytes_show_before_it_ends(culvert_path, servers, procs):
    echo = servers(EchoServer())
    fwd = start(culvert_path, ["forward", "tcp", "0", f"127.0.0.1:{echo.port}", "--admin", "0"], TCP_RE)
    procs.append(fwd)
    listen = parse_addr(fwd.wait_stdout(TCP_RE)[0].group(1))
    base = admin_url(fwd)
    service = f"127.0.0.1:{listen[1]}"
    with connect(listen) as s:
        s.sendall(b"x" * 5000)
        recv_exactly(s, 5000)
        samples = scrape(base)
        assert value(samples, "culvert_connections_active", service=service) == 1
        assert value(samples, "culvert_transfer_bytes_total", service=service, direction="up") == 5000
        assert value(samples, "culvert_transfer_bytes_total", service=service, direction="down") == 5000


def test_refused_and_failed_connections_are_counted(culvert_path, procs):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    fwd = start(culvert_path, ["forward", "tcp", "0", f"127.0.0.1:{dead_port}", "--admin", "0"], TCP_RE)
    procs.append(fwd)
    listen = parse_addr(fwd.wait_stdout(TCP_RE)[0].group(1))
    for _ in range(3):
        # The forwarder resets the client when no target answers; that can surface from
        # connect() already.
        assert connect_expect_closed(listen, 5) in ("reset", "eof")
    service = f"127.0.0.1:{listen[1]}"
    poll(lambda: value(scrape(admin_url(fwd)), "culvert_connections_total", service=service, result="connect-failed") == 3,
         10, "three failed connects counted")


def test_forward_udp_metrics_count_datagrams(culvert_path, procs):
    upstream = UdpServer(lambda d: d)
    try:
        fwd = start(culvert_path, ["forward", "udp", "0", f"127.0.0.1:{upstream.port}", "--admin", "0"], UDP_RE)
        procs.append(fwd)
        listen = parse_addr(fwd.wait_stdout(UDP_RE)[0].group(1))
        service = f"127.0.0.1:{listen[1]}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            for i in range(10):
                s.sendto(b"d" * (100 + i), listen)
                assert s.recv(2000) == b"d" * (100 + i)
        samples = scrape(admin_url(fwd))
        assert value(samples, "culvert_udp_datagrams_total", service=service, direction="up") == 10
        assert value(samples, "culvert_udp_datagrams_total", service=service, direction="down") == 10
        assert value(samples, "culvert_transfer_bytes_total", service=service, direction="up") == sum(100 + i for i in range(10))
        assert value(samples, "culvert_connections_active", service=service) == 1
    finally:
        upstream.close()


# With the token's PSK a wrong token fails the TLS handshake. (On plain the client
# checks the server's proof first and hangs up, so the server sees no proof to count.)
def test_tunnel_metrics_sessions_visitors_and_auth_failures(kit, mode="tls-psk", reason="tls_handshake"):
    echo = kit.echo()
    server = kit.start_server(mode=mode, opts=["--admin", "0"])
    server_admin = admin_url(server)
    client = kit.start_client(server.server_addr, [f"0:{local_of(echo)}"], mode=mode, opts=["--admin", "0"])
    client_admin = admin_url(client)
    public = client.exposed_map[local_of(echo)]
    with connect(public) as s:
        s.sendall(b"y" * 7000)
        s.shutdown(socket.SHUT_WR)
        assert recv_exactly(s, 7000) == b"y" * 7000

    def server_counted():
        m = scrape(server_admin)
        return total(m, "culvert_connections_total") == 1 and m

    samples = poll(server_counted, 10, "the visitor in the server's metrics")
    assert value(samples, "culvert_tunnel_sessions") == 1
    assert total(samples, "culvert_transfer_bytes_total", direction="up") == 7000
    assert value(samples, "culvert_connect_duration_seconds_count") == 1
    client_samples = poll(lambda: (m := scrape(client_admin)) and total(m, "culvert_connections_total") == 1 and m,
                          10, "the visitor in the client's metrics")
    assert value(client_samples, "culvert_tunnel_sessions") == 1
    assert value(client_samples, "culvert_tunnel_reconnects_total") == 0
    assert total(client_samples, "culvert_transfer_bytes_total", direction="down") == 7000
    status = json.loads(get(client_admin + "/status")[2])
    assert status["sessions"] == 1
    assert [s["ports"] for s in status["services"]] == [[f"127.0.0.1:{public[1]}"]]

    wrong = kit.write_token(new_token(), "wrong")
    intruder = kit.start_client(server.server_addr, [f"0:{local_of(echo)}"], mode=mode, token_file=wrong, ready=False)
    assert intruder.wait_exit_code(15) == 1
    poll(lambda: value(scrape(server_admin), "culvert_auth_failures_total", reason=reason) == 1,
         10, "the failed authentication counted")


UDP_EXPOSED_RE = re.compile(r"^exposed udp (\S+) -> \S+$")


def test_tunnel_udp_metrics_count_datagrams_bytes_and_drops(kit):
    upstream = UdpServer(lambda d: d)
    kit.servers.append(upstream)
    server = kit.start_server(mode="plain", opts=["--admin", "0"])
    server_admin = admin_url(server)
    client = kit.start_client(server.server_addr, [f"udp:127.0.0.1:0:127.0.0.1:{upstream.port}"], mode="plain",
                              opts=["--admin", "0", "--udp-max-sessions", "1"], ready=False)
    public = parse_addr(client.wait_stdout(UDP_EXPOSED_RE)[0].group(1))
    client_admin = admin_url(client)
    sizes = [100 + 37 * i for i in range(10)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for i, size in enumerate(sizes):
            s.sendto(bytes([i]) * size, public)
            assert s.recv(2000) == bytes([i]) * size
        # A second visitor finds the client's one session taken: dropped and counted there.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.sendto(b"late", public)

            def both_counted():
                m = scrape(server_admin), scrape(client_admin)
                return total(m[0], "culvert_udp_datagrams_total", direction="up") == 11 and \
                    total(m[1], "culvert_udp_dropped_total", reason="session_limit") == 1 and m

            server_samples, client_samples = poll(both_counted, 10, "the datagrams in both ends' metrics")
    service = f"127.0.0.1:{public[1]}"
    assert value(server_samples, "culvert_udp_datagrams_total", service=service, direction="down") == 10
    assert value(server_samples, "culvert_transfer_bytes_total", service=service, direction="up") == sum(sizes) + 4
    assert value(server_samples, "culvert_transfer_bytes_total", service=service, direction="down") == sum(sizes)
    assert total(server_samples, "culvert_udp_dropped_total") == 0
    assert total(client_samples, "culvert_udp_datagrams_total", direction="up") == 10
    assert total(client_samples, "culvert_udp_datagrams_total", direction="down") == 10
    assert total(client_samples, "culvert_transfer_bytes_total", direction="up") == sum(sizes)
    assert total(client_samples, "culvert_transfer_bytes_total", direction="down") == sum(sizes)
    assert total(client_samples, "culvert_connections_active") == 1
    assert total(client_samples, "culvert_udp_dropped_total") == 1
    status = json.loads(get(server_admin + "/status")[2])
    assert [(s["name"], s["kind"], s["ports"]) for s in status["services"]] == [(service, "udp", [service])]


def test_proxy_metrics_count_connections_and_bytes(culvert_path, servers, procs):
    echo = servers(EchoServer())
    proxy = start(culvert_path, ["proxy", "0", "--admin", "0"], re.compile(r"^listening proxy (\S+)$"))
    procs.append(proxy)
    listen = parse_addr(proxy.wait_stdout(re.compile(r"^listening proxy (\S+)$"))[0].group(1))
    base = admin_url(proxy)
    sizes = [10, 70_000]
    for size in sizes:
        with connect(listen) as s:
            s.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}\r\n\r\n".encode())
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += s.recv(1)
            assert head.startswith(b"HTTP/1.1 200"), head
            s.sendall(b"p" * size)
            s.shutdown(socket.SHUT_WR)
            assert recv_exactly(s, size) == b"p" * size

    service = f"127.0.0.1:{listen[1]}"
    samples = poll(lambda: (m := scrape(base)) and total(m, "culvert_connections_total", service=service) == 2 and m,
                   10, "two proxied connections in the metrics")
    assert value(samples, "culvert_build_info", version="0.1.0", command="proxy") == 1
    assert value(samples, "culvert_connections_active", service=service) == 0
    assert value(samples, "culvert_transfer_bytes_total", service=service, direction="up") == sum(sizes)
    assert value(samples, "culvert_transfer_bytes_total", service=service, direction="down") == sum(sizes)
    status = json.loads(get(base + "/status")[2])
    assert [(s["name"], s["ports"]) for s in status["services"]] == [(service, [service])]


def test_healthz_and_http_errors(culvert_path, servers, procs):
    echo = servers(EchoServer())
    fwd = start(culvert_path, ["forward", "tcp", "0", f"127.0.0.1:{echo.port}", "--admin", "0"], TCP_RE)
    procs.append(fwd)
    base = admin_url(fwd)
    assert get(base + "/healthz")[::2] == (200, "ok\n")
    assert get(base + "/nothing")[0] == 404
    request = urllib.request.Request(base + "/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405 and refused.value.headers["Allow"] == "GET"
    host, port = parse_addr(fwd.wait_stdout(ADMIN_RE)[0].group(1))
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 10000 + b"\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 400 ")


def test_non_loopback_admin_needs_a_token_file(culvert_path, servers):
    echo = servers(EchoServer())
    r = run_culvert(culvert_path, ["forward", "tcp", "0", f"127.0.0.1:{echo.port}", "--admin", ":0"])
    assert r.returncode == 2
    assert "--admin *:0 is reachable from other hosts: add --admin-token-file FILE" in r.stderr


def test_token_file_requires_bearer_token(culvert_path, servers, procs, tmp_path):
    echo = servers(EchoServer())
    token = new_token()
    token_file = tmp_path / "admin-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    fwd = start(culvert_path, ["forward", "tcp", "0", f"127.0.0.1:{echo.port}", "--admin", "0",
                               "--admin-token-file", str(token_file)], TCP_RE)
    procs.append(fwd)
    base = admin_url(fwd)
    for path in ("/metrics", "/status", "/healthz"):
        assert get(base + path)[0] == 401
        assert get(base + path, token="wrong-token-of-some-length")[0] == 401
        assert get(base + path, token=token)[0] == 200


def test_config_files_set_the_admin_endpoint(culvert_path, servers, procs, tmp_path):
    echo = servers(EchoServer())
    token = new_token()
    token_file = tmp_path / "admin-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    tunnel_token = tmp_path / "tunnel-token"
    tunnel_token.write_text(new_token() + "\n")
    tunnel_token.chmod(0o600)
    files = {
        "forward": f'listen = "0"\ntargets = ["127.0.0.1:{echo.port}"]\n',
        "proxy": 'listen = "0"\n',
        "server": f'listen = "127.0.0.1:0"\ntransport = "plain"\ntoken_file = "{tunnel_token}"\n',
    }
    for name, text in files.items():
        (tmp_path / f"{name}.toml").write_text(text + f'admin = "127.0.0.1:0"\nadmin_token_file = "{token_file}"\n')
    fwd = start(culvert_path, ["forward", "tcp", "-c", str(tmp_path / "forward.toml")], TCP_RE)
    proxy = start(culvert_path, ["proxy", "-c", str(tmp_path / "proxy.toml")], re.compile(r"^listening proxy "))
    server = start(culvert_path, ["server", "-c", str(tmp_path / "server.toml")], re.compile(r"^listening tunnel "))
    procs.extend([fwd, proxy, server])
    for proc, command in ((fwd, "forward tcp"), (proxy, "proxy"), (server, "server")):
        base = admin_url(proc)
        assert get(base + "/metrics")[0] == 401, command
        assert value(scrape(base, token=token), "culvert_build_info", version="0.1.0", command=command) == 1

    # The command line's --admin wins over the file's; the file's token file still applies.
    fwd_port = free_port()
    overridden = start(culvert_path, ["forward", "tcp", "-c", str(tmp_path / "forward.toml"), "--admin", str(fwd_port)], TCP_RE)
    procs.append(overridden)
    assert admin_url(overridden) == f"http://127.0.0.1:{fwd_port}"
    assert get(admin_url(overridden) + "/healthz", token=token)[0] == 200

    # A reachable address in the file needs a token file, as on the command line.
    (tmp_path / "open.toml").write_text(files["proxy"] + 'admin = ":0"\n')
    r = run_culvert(culvert_path, ["proxy", "-c", str(tmp_path / "open.toml")])
    assert r.returncode == 2
    assert "is reachable from other hosts: add --admin-token-file FILE" in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifySocket:
    """A stand-in for systemd's notification socket: an AF_UNIX datagram socket."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if not address.startswith("@") else "\0" + address[1:])
        self.address = address

    def expect(self, message: str, timeout: float = 10.0) -> list[str]:
        """Every datagram received until one equal to `message`."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                seen.append(self.sock.recv(4096).decode())
            except socket.timeout:
                raise AssertionError(f"no {message!r} within {timeout}s; got {seen}")
            if seen[-1] == message:
                return seen

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_watchdog_stopping(culvert_path, servers, procs, tmp_path, monkeypatch, abstract):
    echo = servers(EchoServer())
    address = f"@culvert-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify")
    notify = NotifySocket(address)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        fwd = Culvert(culvert_path, ["forward", "tcp", "0", f"127.0.0.1:{echo.port}"])
        procs.append(fwd)
        before_ready = notify.expect("READY=1")
        assert before_ready == ["READY=1"]
        # READY=1 follows the ready line's write; the test's reader of stdout may lag it.
        poll(lambda: fwd.stdout_lines, 5, "the ready line")
        assert TCP_RE.match(fwd.stdout_lines[0])
        notify.expect("WATCHDOG=1")
        notify.expect("WATCHDOG=1", timeout=1)
        fwd.send_signal(signal.SIGTERM)
        notify.expect("STOPPING=1")
        assert fwd.wait_exit(15) == 0
    finally:
        notify.close()


def test_systemd_units_verify(tmp_path, culvert_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = REPO_ROOT / "contrib" / "systemd"
    for unit in ("culvert-server.service", "culvert-client@.service"):
        # The units name the installed binary; point them at the one under test.
        text = (units / unit).read_text().replace("/usr/local/bin/culvert", culvert_path)
        (tmp_path / unit).write_text(text)
    instance = tmp_path / "culvert-client@office.service"
    instance.symlink_to(tmp_path / "culvert-client@.service")
    r = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "culvert-server.service"), str(instance)],
                       capture_output=True, text=True, timeout=60)
    problems = [l for l in r.stderr.splitlines() if str(tmp_path) in l or "culvert" in l]
    assert r.returncode == 0 and not problems, r.stderr
