"""End-to-end tests of `culvert proxy -c FILE`: the options as TOML keys, the command
line over the file, and the file's mistakes as usage errors naming the key.

Loopback only; every wait is bounded (ready lines, socket timeouts, polls)."""

from __future__ import annotations

from conftest import Culvert, EchoServer, parse_addr, run_culvert
from proxy_support import READY_RE, connect_code


def test_config_file_sets_the_options_and_flags_override_it(culvert_path, tmp_path):
    echo, other = EchoServer(), EchoServer()
    try:
        conf = tmp_path / "proxy.toml"
        conf.write_text(
            'listen = "127.0.0.1:0"\n'
            f'deny = ["127.0.0.1:{echo.port}"]\n'
            'connect_timeout = "2s"\nhandshake_timeout = 5\nidle_timeout = "off"\n'
            'udp_idle_timeout = "30s"\nmax_udp_associations = 7\nthreads = 1\nlog_level = "info"\n'
        )
        p = Culvert(culvert_path, ["proxy", "-c", str(conf)])
        try:
            address = parse_addr(p.wait_stdout(READY_RE)[0].group(1))
            assert "max_udp_associations=7" in p.wait_stderr(r"proxy started")[0]
            assert connect_code(address, echo.port) == 0x02
            assert connect_code(address, other.port) == 0x00
        finally:
            p.kill()
        # a list on the command line replaces the file's
        p = Culvert(culvert_path, ["proxy", "-c", str(conf), "--deny", f"127.0.0.1:{other.port}"])
        try:
            address = parse_addr(p.wait_stdout(READY_RE)[0].group(1))
            assert connect_code(address, echo.port) == 0x00
            assert connect_code(address, other.port) == 0x02
        finally:
            p.kill()
    finally:
        echo.close()
        other.close()


def test_config_file_mistakes_are_usage_errors(culvert_path, tmp_path):
    conf = tmp_path / "proxy.toml"
    conf.write_text('listen = "127.0.0.1:0"\nmax_conections = 5\n')
    r = run_culvert(culvert_path, ["proxy", "-c", str(conf)])
    assert r.returncode == 2 and "max_conections" in r.stderr and "unknown key" in r.stderr
    conf.write_text('listen = "0.0.0.0:0"\n')
    r = run_culvert(culvert_path, ["proxy", "-c", str(conf)])
    assert r.returncode == 2 and "--no-auth" in r.stderr
    conf.write_text('deny = ["10.0.0.0/33"]\n')
    r = run_culvert(culvert_path, ["proxy", "-c", str(conf), "0"])
    assert r.returncode == 2 and "deny" in r.stderr
    r = run_culvert(culvert_path, ["proxy"])
    assert r.returncode == 2 and "-c FILE" in r.stderr
