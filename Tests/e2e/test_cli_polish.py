"""The command line as a new user meets it: a missing subcommand, a bad help topic, a
negative number, a port 0 target, a config or token error, durations in JSON logs, and
the config-typo example of the README, run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, Culvert, connect, free_port

TOKEN = "polish-test-token-0123456789abcdef"


def run(culvert_path: str, *args: str, cwd: Path | None = None, token: str | None = None,
        timeout: float = 15.0) -> subprocess.CompletedProcess:
    """culvert run to its end, without a token from the environment unless given."""
    env = {k: v for k, v in os.environ.items() if k != "CULVERT_TOKEN"}
    if token is not None:
        env["CULVERT_TOKEN"] = token
    try:
        return subprocess.run([culvert_path, *args], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"culvert {args!r} did not exit within {timeout}s (it should have refused to start); "
                    f"stderr={exc.stderr!r}")


def leaf_commands(culvert_path: str) -> list[tuple[list[str], dict]]:
    """Every runnable subcommand with its argument list, as ArgumentParser describes them."""
    out = subprocess.run([culvert_path, "--experimental-dump-help"], capture_output=True, text=True, check=True)
    leaves: list[tuple[list[str], dict]] = []

    def walk(command: dict, path: list[str]) -> None:
        subs = [s for s in command.get("subcommands", []) if s["commandName"] != "help"]
        if not subs:
            leaves.append((path, command))
        for sub in subs:
            walk(sub, path + [sub["commandName"]])

    walk(json.loads(out.stdout)["command"], [])
    return leaves


# --------------------------------------------------------------------------
# subcommands and help


@pytest.mark.parametrize("args, usage", [
    ([], "USAGE: culvert <subcommand>"),
    (["forward"], "USAGE: culvert forward <subcommand>"),
])
def test_a_group_without_its_subcommand_prints_help_to_stderr_and_exits_2(culvert_path, args, usage):
    r = run(culvert_path, *args)
    assert r.returncode == 2, r
    assert r.stdout == "", r.stdout
    assert usage in r.stderr, r.stderr
    assert "SUBCOMMANDS:" in r.stderr, r.stderr


def test_asked_for_help_still_goes_to_stdout_with_status_0(culvert_path):
    for args in (["--help"], ["forward", "--help"], ["help", "forward", "tcp"], ["help"]):
        r = run(culvert_path, *args)
        assert r.returncode == 0, (args, r)
        assert "USAGE: culvert" in r.stdout and r.stderr == "", (args, r)


@pytest.mark.parametrize("args, message", [
    (["help", "bogus"], "Error: no command 'bogus' in 'culvert': give one of forward, proxy, server, client, pipe, token, check"),
    (["help", "forward", "bogus"], "Error: no command 'bogus' in 'culvert forward': give one of tcp, udp, ws"),
])
def test_help_for_a_command_that_does_not_exist_is_a_usage_error(culvert_path, args, message):
    r = run(culvert_path, *args)
    assert r.returncode == 2, r
    assert r.stdout == "", r.stdout
    assert r.stderr.splitlines()[0] == message, r.stderr


# --------------------------------------------------------------------------
# negative numbers


def test_no_option_reports_a_negative_value_as_missing(culvert_path):
    """Every option of every command, given -5: a usage error that is not 'Missing value'.
    No positional argument is given, so no command can start."""
    checked = 0
    for path, command in leaf_commands(culvert_path):
        for arg in command.get("arguments", []):
            if arg["kind"] != "option" or arg["preferredName"]["kind"] != "long":
                continue
            option = "--" + arg["preferredName"]["name"]
            r = run(culvert_path, *path, option, "-5")
            assert r.returncode == 2, (path, option, r)
            assert "Missing value" not in r.stderr, (path, option, r.stderr)
            checked += 1
    assert checked > 50, checked


# (command, option) for every number and duration option; the message names why -5 is bad.
NUMERIC_OPTIONS = [
    (["forward", "tcp"], o) for o in ("--connect-timeout", "--idle-timeout", "--max-connections", "--drain-timeout",
                                      "--threads", "--ws-ping", "--ws-max-message")
] + [
    (["forward", "udp"], o) for o in ("--idle-timeout", "--max-sessions", "--socket-buffer", "--threads")
] + [
    (["forward", "ws"], o) for o in ("--connect-timeout", "--idle-timeout", "--max-connections", "--drain-timeout",
                                     "--threads", "--ws-ping", "--ws-max-message")
] + [
    (["proxy"], o) for o in ("--connect-timeout", "--handshake-timeout", "--idle-timeout", "--max-connections",
                             "--drain-timeout", "--threads")
] + [
    (["server"], o) for o in ("--heartbeat-interval", "--heartbeat-misses", "--handshake-timeout", "--drain-timeout",
                              "--threads", "--max-clients", "--max-services", "--max-unauthenticated",
                              "--max-unauthenticated-per-source")
] + [
    (["client"], o) for o in ("--heartbeat-interval", "--heartbeat-misses", "--handshake-timeout", "--drain-timeout",
                              "--threads", "--pool", "--mux", "--connect-timeout", "--reconnect-max",
                              "--udp-idle-timeout", "--udp-max-sessions", "--max-visitors")
] + [
    (["pipe"], "--connect-timeout"),
]


@pytest.mark.parametrize("command, option", NUMERIC_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_negative_number_or_duration_is_called_invalid(culvert_path, command, option):
    # Arguments that pass everything else, so the option is what stops the command.
    rest = {"forward": ["127.0.0.1:0", "127.0.0.1:9"], "proxy": ["127.0.0.1:0"], "client": ["127.0.0.1", "-R", "0:127.0.0.1:22"],
            "pipe": ["127.0.0.1:9"], "server": []}[command[0]]
    if command == ["forward", "tcp"] and option.startswith("--ws-"):
        rest = ["127.0.0.1:0", "ws://127.0.0.1:9/"]
    r = run(culvert_path, *command, option, "-5", *rest, token=TOKEN)
    assert r.returncode == 2, r
    first = r.stderr.splitlines()[0]
    assert re.search(r"'-5' is invalid|invalid .*'-5'|must be .*(got -5|at least|more than)", first), first
    assert f"Usage: culvert {' '.join(command)}" in r.stderr, r.stderr


# --------------------------------------------------------------------------
# the usage shown is the command's


def test_token_and_config_errors_show_the_usage_of_the_command(culvert_path, tmp_path):
    (tmp_path / "bad.toml").write_text("nonsense = 1\n")
    cases = [
        (["server", "--token-file", str(tmp_path / "missing")], "culvert server"),
        (["client", "127.0.0.1", "-R", "0:127.0.0.1:22", "--token-file", str(tmp_path / "missing")], "culvert client"),
        (["client", "-c", "bad.toml"], "culvert client"),
        (["server", "-c", "bad.toml"], "culvert server"),
        (["forward", "tcp", "-c", "bad.toml"], "culvert forward tcp"),
        (["check", "-c", "bad.toml"], "culvert check"),
        (["pipe", "--via", "127.0.0.1", "--service", "x"], "culvert pipe"),
    ]
    for args, command in cases:
        r = run(culvert_path, *args, cwd=tmp_path)
        assert r.returncode == 2, (args, r)
        assert r.stderr.startswith("Error: "), (args, r.stderr)
        assert f"\nUsage: {command} " in r.stderr, (args, r.stderr)
        assert f"See '{command} --help'" in r.stderr, (args, r.stderr)


# --------------------------------------------------------------------------
# port 0 where culvert connects

PORT_0 = "port 0 is for listening only: give the port to connect to (1-65535)"


def test_port_0_is_refused_wherever_culvert_connects(culvert_path, tmp_path):
    (tmp_path / "fwd.toml").write_text('[services.a]\nlisten = "127.0.0.1:0"\ntargets = ["127.0.0.1:0"]\n')
    (tmp_path / "client.toml").write_text('server = "127.0.0.1:0"\n[services.a]\nremote_port = 0\nlocal = "127.0.0.1:22"\n')
    cases = [
        (["forward", "tcp", "127.0.0.1:0", "127.0.0.1:0"], "invalid address '127.0.0.1:0'"),
        (["forward", "tcp", "127.0.0.1:0", "127.0.0.1:9", ":0"], "invalid address '127.0.0.1:0'"),
        (["forward", "udp", "127.0.0.1:0", "127.0.0.1:0"], "invalid address '127.0.0.1:0'"),
        (["forward", "ws", "127.0.0.1:0", "127.0.0.1:0"], "invalid address '127.0.0.1:0'"),
        (["forward", "tcp", "-c", "fwd.toml"], "config fwd.toml: services.a.targets: invalid address '127.0.0.1:0'"),
        (["pipe", "127.0.0.1:0"], "invalid address '127.0.0.1:0'"),
        (["pipe", "--via", "127.0.0.1:0", "--service", "x"], "invalid address '127.0.0.1:0'"),
        (["client", "127.0.0.1:0", "-R", "0:127.0.0.1:22"], "invalid address '127.0.0.1:0'"),
        (["client", "-c", "client.toml"], "config client.toml: server: invalid address '127.0.0.1:0'"),
    ]
    for args, message in cases:
        r = run(culvert_path, *args, cwd=tmp_path, token=TOKEN)
        assert r.returncode == 2, (args, r)
        assert message in r.stderr and PORT_0 in r.stderr, (args, r.stderr)


def test_port_0_still_binds_a_free_port_for_listening(culvert_path, echo_server):
    c = Culvert(culvert_path, ["forward", "tcp", "127.0.0.1:0", echo_server.address])
    try:
        listen, _ = c.wait_ready(1)[0]
        assert not listen.endswith(":0"), listen
    finally:
        c.kill()


# --------------------------------------------------------------------------
# durations in JSON logs


def json_records(c: Culvert) -> list[dict]:
    with c._cond:
        lines = list(c.stderr_lines)
    return [json.loads(l) for l in lines if l.startswith("{")]


def wait_json(c: Culvert, msg: str) -> dict:
    c.wait_stderr(r'"msg":"%s"' % re.escape(msg))
    return next(r for r in json_records(c) if r["msg"] == msg)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def test_json_logs_write_deadlines_and_backoffs_as_numbers_of_seconds(culvert_path, echo_server):
    dead = f"127.0.0.1:{free_port()}"
    c = Culvert(culvert_path, ["forward", "tcp", "--log-format", "json", "--drain-timeout", "1.5",
                               "127.0.0.1:0", dead, echo_server.address])
    try:
        listen, _ = c.wait_ready(1)[0]
        host, port = listen.rsplit(":", 1)
        for _ in range(2):  # round-robin: one of the two meets the dead target first
            with connect((host, int(port))) as s:
                s.sendall(b"x")
                assert s.recv(1) == b"x"
        unreachable = wait_json(c, "target unreachable")
        assert is_number(unreachable["backoff"]) and unreachable["backoff"] == 1, unreachable
        held = connect((host, int(port)))
        c.send_signal()
        draining = wait_json(c, "draining")
        assert draining["deadline"] == 1.5 and is_number(draining["deadline"]), draining
        held.close()
        assert c.wait_exit() == 0
    finally:
        c.kill()


def test_json_logs_write_the_reconnect_delay_as_a_number(culvert_path, tmp_path):
    env_token = tmp_path / "token"
    env_token.write_text(TOKEN + "\n")
    env_token.chmod(0o600)
    c = Culvert(culvert_path, ["client", "--log-format", "json", "--token-file", str(env_token),
                               f"127.0.0.1:{free_port()}", "-R", "0:127.0.0.1:22"])
    try:
        reconnecting = wait_json(c, "reconnecting")
        assert is_number(reconnecting["delay"]) and 0 < reconnecting["delay"] <= 1, reconnecting
    finally:
        c.kill()


def test_text_logs_keep_durations_as_written(culvert_path, echo_server):
    c = Culvert(culvert_path, ["forward", "tcp", "--drain-timeout", "1500ms", "127.0.0.1:0", echo_server.address])
    try:
        listen, _ = c.wait_ready(1)[0]
        host, port = listen.rsplit(":", 1)
        held = connect((host, int(port)))
        c.send_signal()
        line = c.wait_stderr(r"draining")[0]
        assert "deadline=1.5s" in line.split(), line
        held.close()
        assert c.wait_exit() == 0
    finally:
        c.kill()


# --------------------------------------------------------------------------
# the README's config-typo example


def test_the_readme_typo_example_prints_what_the_readme_shows(culvert_path, tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    m = re.search(r"With this `client\.toml`:\n\n```toml\n(.*?)```\n\n`culvert client -c client\.toml` prints, "
                  r"and exits with status 2:\n\n```\n(.*?)```", readme, re.S)
    assert m, "the README's typo example is not where this test looks for it"
    (tmp_path / "client.toml").write_text(m.group(1))
    r = run(culvert_path, "client", "-c", "client.toml", cwd=tmp_path)
    assert r.returncode == 2, r
    assert r.stderr == m.group(2), r.stderr
    # The one-line examples next to it, and those of culvert(1) and culvert.toml(5), are real too.
    error_line = m.group(2).splitlines()[0]
    for page in ("man/culvert.1", "man/culvert.toml.5"):
        assert error_line in (REPO_ROOT / page).read_text(), page
    (tmp_path / "client.toml").write_text(m.group(1).replace("local =", "locl ="))
    missing = run(culvert_path, "client", "-c", "client.toml", cwd=tmp_path).stderr.splitlines()[0]
    assert missing in readme and missing in (REPO_ROOT / "man/culvert.toml.5").read_text(), missing
