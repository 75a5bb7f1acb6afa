"""Forwarders under test. Each is one start function `start_X(ctx, target_port) ->
Forwarder` plus one entry in TOOLS. A start function writes its own config into
ctx.tmp, starts the tool on 127.0.0.1 (a fresh free high port), waits until it is
listening, and raises StartError (after killing what it started) if it does not come up.

To add a forwarder kind: write start_<kind>() and append a Tool(...) to TOOLS."""
import getpass
import os
from dataclasses import dataclass, field

from benchlib import (StartError, free_port, kill_proc, read_ready_line, run_cmd,
                      spawn, wait_listening)

START_TIMEOUT = 10.0


class Forwarder:
    """A running forwarder: clients connect to 127.0.0.1:port. procs are the processes
    we started (their descendants are found at measurement time)."""

    def __init__(self, name, port, procs):
        self.name, self.port, self.procs = name, port, list(procs)

    def root_pids(self):
        return [p.pid for p in self.procs]

    def exited(self):
        """Return a description if any started process has exited, else None."""
        for p in self.procs:
            if p.poll() is not None:
                return f"{self.name} exited with status {p.returncode} during the run"
        return None

    def stop(self):
        for p in reversed(self.procs):  # e.g. ssh client before sshd
            kill_proc(p)


def _log(ctx, name):
    return os.path.join(ctx.tmp, f"{name.replace(' ', '_')}.log")


def _start_listening(ctx, name, cmd, port, extra_procs=()):
    """Spawn cmd, wait for `port` to be in LISTEN state."""
    p = spawn(cmd, _log(ctx, name))
    try:
        wait_listening(port, [p, *extra_procs], ctx.start_timeout)
    except BaseException:
        kill_proc(p)
        raise
    return p


# --------------------------------------------------------------------------- the tools

def start_direct(ctx, target_port):
    """No forwarder: clients talk straight to the back end."""
    return Forwarder("direct", target_port, [])


def _culvert(ctx, target_port, name, extra):
    cmd = [ctx.culvert, "forward", "tcp", *extra, "--log-level", "warning",
           "127.0.0.1:0", f"127.0.0.1:{target_port}"]
    if not os.access(ctx.culvert, os.X_OK):
        raise StartError(f"{ctx.culvert} not found or not executable (make build)")
    p = spawn(cmd, _log(ctx, name), stdout_pipe=True)
    try:
        port = read_ready_line(p, ctx.start_timeout)
        wait_listening(port, [p], ctx.start_timeout)
    except BaseException:
        kill_proc(p)
        raise
    return Forwarder(name, port, [p])


def start_culvert(ctx, target_port):
    return _culvert(ctx, target_port, "culvert", [])


def start_culvert_nosplice(ctx, target_port):
    return _culvert(ctx, target_port, "culvert --no-splice", ["--no-splice"])


def start_socat(ctx, target_port):
    port = free_port()
    cmd = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
           f"TCP:127.0.0.1:{target_port}"]
    return Forwarder("socat", port, [_start_listening(ctx, "socat", cmd, port)])


HAPROXY_CFG = """\
global
    nbthread 2
    maxconn 7500
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    option splice-request
    option splice-response
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{target}
"""


def start_haproxy(ctx, target_port):
    port = free_port()
    cfg = os.path.join(ctx.tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(HAPROXY_CFG.format(port=port, target=target_port))
    cmd = ["haproxy", "-db", "-f", cfg]
    return Forwarder("haproxy", port, [_start_listening(ctx, "haproxy", cmd, port)])


def start_rinetd(ctx, target_port):
    port = free_port()
    cfg = os.path.join(ctx.tmp, "rinetd.conf")
    with open(cfg, "w") as f:
        f.write(f"127.0.0.1 {port} 127.0.0.1 {target_port}\n")
    cmd = ["rinetd", "-f", "-c", cfg]
    return Forwarder("rinetd", port, [_start_listening(ctx, "rinetd", cmd, port)])


def start_redir(ctx, target_port):
    port = free_port()
    cmd = ["redir", "-n", "-l", "err", f"127.0.0.1:{port}", f"127.0.0.1:{target_port}"]
    return Forwarder("redir", port, [_start_listening(ctx, "redir", cmd, port)])


SSHD_CFG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {tmp}/ssh_host_key
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
PermitOpen any
X11Forwarding no
PrintMotd no
MaxStartups 100:30:200
LogLevel ERROR
"""


def _ssh_keys(ctx):
    """Throwaway host and user keys (made once per harness run, in ctx.tmp)."""
    host, user = os.path.join(ctx.tmp, "ssh_host_key"), os.path.join(ctx.tmp, "user_key")
    for k in (host, user):
        if not os.path.exists(k):
            rc, _, err = run_cmd(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                  "culvert-bench-throwaway", "-f", k], timeout=20)
            if rc != 0:
                raise StartError(f"ssh-keygen failed: {err.strip()}")
    with open(user + ".pub") as f, open(os.path.join(ctx.tmp, "authorized_keys"), "w") as g:
        g.write(f.read())
    return user


def start_ssh(ctx, target_port):
    """sshd on a loopback port with its own config, then `ssh -N -L` through it."""
    sshd = "/usr/sbin/sshd"
    if not os.access(sshd, os.X_OK):
        raise StartError("sshd not installed")
    user_key = _ssh_keys(ctx)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
    sshd_port = free_port()
    cfg = os.path.join(ctx.tmp, "sshd_config")
    with open(cfg, "w") as f:
        f.write(SSHD_CFG.format(port=sshd_port, tmp=ctx.tmp))
    d = _start_listening(ctx, "sshd", [sshd, "-D", "-e", "-f", cfg], sshd_port)
    try:
        port = free_port()
        cmd = ["ssh", "-N", "-F", "/dev/null", "-i", user_key, "-p", str(sshd_port),
               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
               "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
               "-L", f"127.0.0.1:{port}:127.0.0.1:{target_port}",
               f"{getpass.getuser()}@127.0.0.1"]
        c = _start_listening(ctx, "ssh", cmd, port, extra_procs=[d])
    except BaseException:
        kill_proc(d)
        raise
    return Forwarder("ssh -L", port, [d, c])


@dataclass
class Tool:
    name: str
    start: callable
    # measurement groups that do not apply to this tool -> shown as "n/a"
    na: set = field(default_factory=set)
    baseline: bool = False  # the "direct" reference


TOOLS = [
    Tool("direct", start_direct, na={"memory"}, baseline=True),
    Tool("culvert", start_culvert),
    Tool("socat", start_socat),
    Tool("haproxy", start_haproxy),
    Tool("rinetd", start_rinetd),
    Tool("redir", start_redir),
    Tool("ssh -L", start_ssh, na={"memory"}),
]

# Available with --tools, not run by default (keeps `make bench` inside its budget).
EXTRA_TOOLS = [
    Tool("culvert --no-splice", start_culvert_nosplice),
]
