"""Tokens at start-up (issue 13, item 7).

Anyone who completes the transport gets the server's proof and can test guesses offline,
so `culvert server`, `culvert client` and `culvert pipe --via` refuse a token under 16
bytes (or empty, or only whitespace) with exit status 2, naming where it came from and
pointing to `culvert token`. Token files are read with a size limit and an errno reason,
a file others can open is warned about once, and the processes holding the token keep it
out of core dumps.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tunnel_support import TunnelKit, clean_env, new_token, run_cli

SIXTEEN = "0123456789abcdef"


# every end that holds the shared token, started so that it would print a ready line
# (or keep retrying) if the token were accepted
ENDS = {
    "server": ["server", "--listen", "127.0.0.1:0"],
    "client": ["client", "127.0.0.1:1", "-R", "0:127.0.0.1:9"],
    "pipe": ["pipe", "--via", "127.0.0.1:1", "--service", "db"],
}

WEAK = {
    "empty": ("", "is empty"),
    "whitespace": (" \t  ", "is only whitespace"),
    "short": ("seven-b", "is too short (7 bytes)"),
    "fifteen": (SIXTEEN[:-1], "is too short (15 bytes)"),
}


def token_source(kit: TunnelKit, source: str, token: str) -> tuple[list[str], dict, str]:
    """(extra args, environment, how the error names the source) for `token` given
    through `source`."""
    env = clean_env()
    if source == "--token":
        return ["--token", token], env, "the token from --token"
    if source == "CULVERT_TOKEN":
        env["CULVERT_TOKEN"] = token
        return [], env, "the token from CULVERT_TOKEN"
    path = kit.write_token(token, "weak.token")
    if source == "--token-file":
        return ["--token-file", path], env, f"the token in --token-file '{path}'"
    config = kit.tmp / "culvert.toml"
    if source == "token_file":
        config.write_text(f'token_file = "{path}"\n')
        return ["-c", str(config)], env, f"config {config}: token_file: the token in '{path}'"
    assert source == "token", source
    config.write_text(f'token = "{token}"\n')
    return ["-c", str(config)], env, f"config {config}: token: the token"


@pytest.mark.parametrize("weak", WEAK, ids=list(WEAK))
@pytest.mark.parametrize("source", ["--token", "CULVERT_TOKEN", "--token-file", "token_file", "token"])
@pytest.mark.parametrize("end", ["server", "client"])
def test_weak_token_refused_at_start(kit, end, source, weak):
    token, reason = WEAK[weak]
    extra, env, named = token_source(kit, source, token)
    r = run_cli([*ENDS[end], *extra], env=env, timeout=10)
    assert r.returncode == 2, r
    assert f"{named} {reason}" in r.stderr, r.stderr
    assert "a token needs at least 16 bytes: make one with 'culvert token'" in r.stderr, r.stderr
    assert r.stdout == "", r.stdout


@pytest.mark.parametrize("weak", WEAK, ids=list(WEAK))
@pytest.mark.parametrize("source", ["--token", "CULVERT_TOKEN", "--token-file"])
def test_weak_token_refused_by_pipe_via(kit, source, weak):
    token, reason = WEAK[weak]
    extra, env, named = token_source(kit, source, token)
    r = run_cli([*ENDS["pipe"], *extra], env=env, timeout=10)
    assert r.returncode == 2, r
    assert f"{named} {reason}" in r.stderr and "'culvert token'" in r.stderr, r.stderr


@pytest.mark.parametrize("end", ["client-secret", "client-visit", "pipe"])
def test_weak_service_token_refused(kit, end):
    short = kit.write_token("short-svc", "svc.token")
    args = {
        "client-secret": ["client", "127.0.0.1:1", "--secret", "db=127.0.0.1:9"],
        "client-visit": ["client", "127.0.0.1:1", "--visit", "db", "-L", "127.0.0.1:0"],
        "pipe": ENDS["pipe"],
    }[end]
    r = run_cli([*args, "--token-file", kit.token_file, "--service-token-file", short], timeout=10)
    assert r.returncode == 2, r
    assert f"the service token in --service-token-file '{short}' is too short (9 bytes)" in r.stderr, r.stderr


def test_weak_service_token_in_config_refused(kit):
    config = kit.tmp / "client.toml"
    config.write_text(f'server = "127.0.0.1:1"\ntoken_file = "{kit.token_file}"\n'
                      '[services.db]\nsecret = true\nlocal = "127.0.0.1:9"\ntoken = "   "\n')
    r = run_cli(["client", "-c", str(config)], timeout=10)
    assert r.returncode == 2, r
    assert f"config {config}: services.db.token: the service token is only whitespace" in r.stderr, r.stderr


def test_sixteen_bytes_are_enough(kit):
    srv = kit.start_server(token_file=kit.write_token(SIXTEEN, "sixteen.token"))
    assert srv.server_addr[1] > 0


@pytest.mark.parametrize("end", ["server", "client"])
def test_token_file_errors_say_why(kit, end):
    missing = str(kit.tmp / "missing.token")
    big = kit.tmp / "big.token"
    big.write_text(new_token() + "\n" + "#" * 4096)
    cases = [
        (missing, f"cannot read --token-file '{missing}': no such file (ENOENT)"),
        (str(kit.tmp), f"cannot read --token-file '{kit.tmp}': it is a directory (EISDIR)"),
        (str(big), f"--token-file '{big}' is larger than 4096 bytes"),
    ]
    # root opens any ordinary file; sysctl files check their mode bits even for root
    if os.geteuid() == 0 and os.path.exists("/proc/sys/vm/drop_caches"):
        cases.append(("/proc/sys/vm/drop_caches",
                      "cannot read --token-file '/proc/sys/vm/drop_caches': permission denied (EACCES)"))
    for path, text in cases:
        r = run_cli([*ENDS[end], "--token-file", path], timeout=10)
        assert r.returncode == 2, r
        assert text in r.stderr, r.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600])
def test_token_file_open_to_others_is_warned_about_once(kit, mode):
    path = kit.write_token(kit.token, "shared.token")
    os.chmod(path, mode)
    srv = kit.start_server(token_file=path)
    cli = kit.start_client(srv.server_addr, ["0:127.0.0.1:9"], token_file=path)
    pattern = rf"^warning token file '{re.escape(path)}' can be read or changed by group or others " \
              rf"\(mode 0{mode:o}\); run chmod 600 '{re.escape(path)}'$"
    expected = 1 if mode & 0o077 else 0
    for p in (srv, cli):
        assert len(p.stderr_matching(pattern)) == expected, p.describe()
        assert len(p.stderr_matching(r"group or others|chmod")) == expected, p.describe()


def core_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        line = next(l for l in f if l.startswith("Max core file size"))
    return " ".join(line.split()[4:6])


def test_server_and_client_keep_the_token_out_of_core_dumps(kit):
    srv = kit.start_server()
    cli = kit.start_client(srv.server_addr, ["0:127.0.0.1:9"])
    for p in (srv, cli):
        assert core_limit(p.pid) == "0 0", p.describe()
        assert not p.stderr_matching(r"core dumps"), p.describe()


def test_a_server_run_by_another_user_is_not_dumpable(kit):
    """Not dumpable: the kernel hands /proc/PID of the process to root, so a process of
    the same user can neither trace it nor read its memory or environment (the token)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the server as another user")
    srv = kit.spawn(["server", "--listen", "127.0.0.1:0"],
                    prefix=["env", f"CULVERT_TOKEN={kit.token}", "setpriv", "--reuid=65534", "--regid=65534",
                            "--clear-groups", "--"])
    srv.listen_addrs(1)
    with open(f"/proc/{srv.pid}/status") as f:
        uids = next(l for l in f if l.startswith("Uid:")).split()[1:]
    assert uids[0] == "65534", uids
    assert os.stat(f"/proc/{srv.pid}/environ").st_uid == 0, "the server is still dumpable"
    # the same user cannot read the token from the environment
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                        "cat", f"/proc/{srv.pid}/environ"], capture_output=True, timeout=10)
    assert r.returncode != 0 and kit.token.encode() not in r.stdout, r
