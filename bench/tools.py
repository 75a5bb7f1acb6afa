"""Forwarders under test. Each is one start function `start_X(ctx, target_port) ->
Forwarder` plus one entry in TOOLS. A start function writes its own config into
ctx.tmp, starts the tool on 127.0.0.1 (a fresh free high port), waits until it is
listening, and raises StartError (after killing what it started) if it does not come up.

To add a forwarder kind: write start_<kind>() and append a Tool(...) to TOOLS (the
forward section) or to the tool list of another section (UDP_TOOLS, TUNNEL_TOOLS, ...;
see sections.py). A tunnel counts as one "forwarder": culvert server + client (or sshd
+ ssh -R), visitors connect to its public port."""
import getpass
import os
from dataclasses import dataclass, field

from benchlib import (StartError, free_port, free_port_tcp_udp, kill_proc, parse_exposed,
                      parse_listening, parse_ready_line, parse_tunnel_ready, read_lines,
                      read_ready_line, run_cmd, spawn, wait_listening, wait_udp_bound)

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
    _check_culvert(ctx)
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


def start_culvert_admin(ctx, target_port):
    """`forward tcp --admin 127.0.0.1:0`: the admin port from its `listening admin`
    line (printed after the forwarder's own) is the Forwarder's `admin_port`."""
    _check_culvert(ctx)
    name = "culvert --admin"
    p = spawn([ctx.culvert, "forward", "tcp", "--admin", "127.0.0.1:0", "--log-level",
               "warning", "127.0.0.1:0", f"127.0.0.1:{target_port}"],
              _log(ctx, name), stdout_pipe=True)
    try:
        first, second = read_lines(p, 2, ctx.start_timeout)
        port = parse_ready_line(first)
        admin = parse_listening(second, "admin")
        wait_listening(port, [p], ctx.start_timeout)
    except ValueError as e:
        kill_proc(p)
        raise StartError(str(e))
    except BaseException:
        kill_proc(p)
        raise
    fwd = Forwarder(name, port, [p])
    fwd.admin_port = admin
    return fwd


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


def _ssh(ctx, target_port, flag, name):
    """sshd on a loopback port with its own config, then `ssh -N -L|-R|-D` through it.
    -L and -D: ssh listens on the port; -R: sshd does (the reverse tunnel's public
    side). -D (a SOCKS proxy) takes no target: target_port is None."""
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
               flag, f"127.0.0.1:{port}" + (f":127.0.0.1:{target_port}" if target_port
                                            else ""),
               f"{getpass.getuser()}@127.0.0.1"]
        c = _start_listening(ctx, name, cmd, port, extra_procs=[d])
    except BaseException:
        kill_proc(d)
        raise
    return Forwarder(name, port, [d, c])


def start_ssh(ctx, target_port):
    return _ssh(ctx, target_port, "-L", "ssh -L")


def start_ssh_reverse(ctx, target_port):
    """`ssh -N -R`: sshd listens on the public port, the ssh client dials the target."""
    return _ssh(ctx, target_port, "-R", "ssh -R")


# --------------------------------------------------------------------------- UDP forwarders
# iperf3 -u runs its TCP control connection to the same port number as the UDP data, so
# each UDP forwarder comes with a TCP forwarder on the same port.

def _check_culvert(ctx):
    if not os.access(ctx.culvert, os.X_OK):
        raise StartError(f"{ctx.culvert} not found or not executable (make build)")


def start_culvert_udp(ctx, target_port):
    """`culvert forward udp` (defaults) + `culvert forward tcp` for iperf3's control."""
    _check_culvert(ctx)
    port = free_port_tcp_udp()
    procs = []
    try:
        for kind in ("udp", "tcp"):
            p = spawn([ctx.culvert, "forward", kind, "--log-level", "warning",
                       f"127.0.0.1:{port}", f"127.0.0.1:{target_port}"],
                      _log(ctx, f"culvert-{kind}"), stdout_pipe=True)
            procs.append(p)
            read_ready_line(p, ctx.start_timeout, lambda x, k=kind: parse_ready_line(x, k))
        wait_listening(port, procs, ctx.start_timeout)
    except BaseException:
        for p in procs:
            kill_proc(p)
        raise
    return Forwarder("culvert", port, procs)


def start_socat_udp(ctx, target_port):
    """socat UDP-LISTEN,fork (one child per client address, which then relays that
    flow both ways) + socat TCP-LISTEN,fork for iperf3's control connection."""
    port = free_port_tcp_udp()
    u = spawn(["socat", f"UDP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
               f"UDP:127.0.0.1:{target_port}"], _log(ctx, "socat-udp"))
    try:
        wait_udp_bound(port, [u], ctx.start_timeout)
        t = _start_listening(ctx, "socat-tcp", [
            "socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
            f"TCP:127.0.0.1:{target_port}"], port, extra_procs=[u])
    except BaseException:
        kill_proc(u)
        raise
    return Forwarder("socat", port, [u, t])


# --------------------------------------------------------------------------- tunnels

def _token(ctx):
    path = os.path.join(ctx.tmp, "tunnel.token")
    if not os.path.exists(path):
        rc, out, err = run_cmd([ctx.culvert, "token"], timeout=10)
        if rc != 0 or not out.strip():
            raise StartError(f"culvert token failed: {err.strip()[-200:]}")
        with open(path, "w") as f:
            f.write(out.strip() + "\n")
        os.chmod(path, 0o600)
    return path


def _tunnel_server(ctx, name, common, log_level="warning"):
    """`culvert server` on a free loopback port -> (process, its tunnel port)."""
    srv = spawn([ctx.culvert, "server", "--listen", "127.0.0.1:0", *common,
                 "--log-level", log_level],
                _log(ctx, name + " server"), stdout_pipe=True)
    try:
        return srv, read_ready_line(srv, ctx.start_timeout, parse_tunnel_ready)
    except BaseException:
        kill_proc(srv)
        raise


def _tunnel_common(ctx, transport, threads):
    """Flags both ends take: token, transport, drain timeout, and --threads when set."""
    common = ["--token-file", _token(ctx), "--transport", transport, "--drain-timeout", "1s"]
    return common + (["--threads", str(threads)] if threads else [])


def start_tunnel(ctx, target_port, name, transport="plain", client_args=(), udp=False,
                 server_log_level="warning", server_args=(), front=None):
    """`culvert server` + `culvert client -R` on loopback; visitors connect to the
    server's public port (the returned Forwarder's port). With udp=True the client
    exposes the target both as TCP and as UDP on one fixed port (iperf3 -u).
    `front(server_port) -> (address the client dials, [processes started])` puts
    something between them (a ws:// URL, nginx); by default the client dials the server."""
    _check_culvert(ctx)
    common = _tunnel_common(ctx, transport, None)
    srv, sport = _tunnel_server(ctx, name, [*common, *server_args], server_log_level)
    middle = []
    try:
        addr, middle = front(sport) if front else (f"127.0.0.1:{sport}", [])
        client_common = common
        if transport in ("ws", "wss"):  # the client takes it from its URL's scheme
            i = common.index("--transport")
            client_common = common[:i] + common[i + 2:]
        if udp:
            pub = free_port_tcp_udp()
            rs = ["-R", f"127.0.0.1:{pub}:127.0.0.1:{target_port}",
                  "-R", f"udp:127.0.0.1:{pub}:127.0.0.1:{target_port}"]
        else:
            rs = ["-R", f"127.0.0.1:0:127.0.0.1:{target_port}"]
        cli = spawn([ctx.culvert, "client", addr, *client_common,
                     "--log-level", "warning", *client_args, *rs],
                    _log(ctx, name + " client"), stdout_pipe=True)
    except BaseException:
        for p in reversed([srv, *middle]):
            kill_proc(p)
        raise
    procs = [srv, *middle, cli]
    try:
        exposed = [parse_exposed(x) for x in read_lines(cli, 2 if udp else 1,
                                                         ctx.start_timeout)]
        port = next(p for proto, p in exposed if proto == "tcp")
        wait_listening(port, procs, ctx.start_timeout)
        if udp:
            wait_udp_bound(port, procs, ctx.start_timeout)
    except BaseException:
        for p in reversed(procs):
            kill_proc(p)
        raise
    fwd = Forwarder(name, port, procs)
    fwd.server_log = srv.log_path
    return fwd


def start_tunnel_clients(ctx, name, targets, threads, transport="plain", client_args=()):
    """One `culvert server` and one `culvert client` per target, each client exposing
    its own target on a public port of its own; server and clients run `--threads
    threads`. The Forwarder's `ports` are the public ports in the order of `targets`,
    `port` the first, `procs[0]` the server."""
    _check_culvert(ctx)
    common = _tunnel_common(ctx, transport, threads)
    srv, sport = _tunnel_server(ctx, name, common)
    procs, ports = [srv], []
    try:
        for i, target in enumerate(targets):
            cli = spawn([ctx.culvert, "client", f"127.0.0.1:{sport}", *common,
                         "--log-level", "warning", *client_args,
                         "-R", f"127.0.0.1:0:127.0.0.1:{target}"],
                        _log(ctx, f"{name} client {i + 1}"), stdout_pipe=True)
            procs.append(cli)
            ports.append(parse_exposed(read_lines(cli, 1, ctx.start_timeout)[0])[1])
        for port in ports:
            wait_listening(port, procs, ctx.start_timeout)
    except BaseException:
        for p in reversed(procs):
            kill_proc(p)
        raise
    fwd = Forwarder(name, ports[0], procs)
    fwd.ports = ports
    return fwd


def start_tunnel_plain(ctx, target_port):
    """The defaults: visitors ride one multiplexed data channel (--mux 1)."""
    return start_tunnel(ctx, target_port, "culvert tunnel plain", "plain")


def start_tunnel_plain_dedicated(ctx, target_port):
    """A dedicated (spliced) data channel per visitor, two kept ready."""
    return start_tunnel(ctx, target_port, "culvert tunnel plain --mux 0", "plain",
                        ["--mux", "0", "--pool", "2"])


def start_tunnel_plain_pool0(ctx, target_port):
    return start_tunnel(ctx, target_port, "culvert tunnel plain --mux 0 --pool 0", "plain",
                        ["--mux", "0", "--pool", "0"])


def start_tunnel_tls(ctx, target_port):
    return start_tunnel(ctx, target_port, "culvert tunnel tls", "tls")


def start_tunnel_tls_dedicated(ctx, target_port):
    return start_tunnel(ctx, target_port, "culvert tunnel tls --mux 0", "tls",
                        ["--mux", "0", "--pool", "2"])


def start_tunnel_plain_logged(ctx, target_port):
    """Server at log level info: its `connection closed` line gives up/down bytes."""
    return start_tunnel(ctx, target_port, "culvert tunnel plain", "plain",
                        server_log_level="info")


def start_tunnel_compress(ctx, target_port):
    return start_tunnel(ctx, target_port, "culvert tunnel plain --compress", "plain",
                        ["--compress"], server_log_level="info")


def start_tunnel_udp(ctx, target_port):
    return start_tunnel(ctx, target_port, "culvert tunnel plain", "plain", udp=True)


# --------------------------------------------------------------------------- WebSocket tunnels
# Issue 15: the tunnel inside a WebSocket, straight (ws, wss) and behind nginx
# terminating TLS. The server's --ws-path and the URL's path agree.

WS_PATH = "/tunnel"


def _certs(ctx):
    """A throwaway CA and a server certificate for localhost / 127.0.0.1 signed by it, made
    once per temp dir -> (ca, cert, key) paths. The client trusts the CA with --ca."""
    d = os.path.join(ctx.tmp, "certs")
    ca, cert, key = (os.path.join(d, n) for n in ("ca.pem", "server.pem", "server.key"))
    if os.path.exists(cert):
        return ca, cert, key
    os.makedirs(d, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    for cmd in (
            ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=culvert bench ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost"],
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem.tmp", "-days", "2", "-extfile", "ext.cnf"]):
        rc, _, err = run_cmd(["openssl", *cmd], timeout=30, cwd=d)
        if rc != 0:
            raise StartError(f"openssl {cmd[0]} failed: {err.strip()[-200:]}")
    os.rename(os.path.join(d, "server.pem.tmp"), cert)  # last: its presence means done
    return ca, cert, key


NGINX_WS_CONF = """\
{user}
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/error.log error;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location {path} {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"""


def nginx_ws_conf(d, port, upstream, cert, key, path=WS_PATH, root=False):
    """nginx as the TLS-terminating reverse proxy of a `--transport ws` server: HTTP/1.1
    to the upstream with the Upgrade/Connection headers passed, which a WebSocket needs."""
    return NGINX_WS_CONF.format(d=d, port=port, upstream=upstream, cert=cert, key=key,
                                path=path, user="user root;" if root else "")


def _start_nginx_front(ctx, name, upstream):
    """nginx on a free port in front of the ws server on `upstream` -> (wss URL, [nginx])."""
    ca, cert, key = _certs(ctx)
    d = os.path.join(ctx.tmp, name.replace(" ", "_") + "_nginx")
    os.makedirs(d, exist_ok=True)
    port = free_port()
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_ws_conf(d, port, upstream, cert, key, root=os.geteuid() == 0))
    p = _start_listening(ctx, name + " nginx", ["nginx", "-c", conf, "-p", d], port)
    return f"wss://localhost:{port}{WS_PATH}", [p]


def _ws_tunnel(ctx, target_port, name, transport, inner=None, behind_nginx=False):
    """`inner`: the --inner both ends get; None leaves the default (auto)."""
    server = ["--ws-path", WS_PATH] + (["--inner", inner] if inner else [])
    client = ["--inner", inner] if inner else []
    if transport == "wss" or behind_nginx:
        ca, cert, key = _certs(ctx)
        client += ["--ca", ca]
        if transport == "wss":
            server += ["--cert", cert, "--key", key]
    if behind_nginx:
        def front(sport):
            return _start_nginx_front(ctx, name, sport)
    else:
        host = "localhost" if transport == "wss" else "127.0.0.1"

        def front(sport):
            return f"{transport}://{host}:{sport}{WS_PATH}", []
    return start_tunnel(ctx, target_port, name, transport, client, server_args=server,
                        front=front)


def start_tunnel_ws(ctx, target_port):
    """Plain HTTP WebSocket, the token's TLS-PSK inside (what --inner auto does on ws)."""
    return _ws_tunnel(ctx, target_port, "culvert tunnel ws", "ws")


def start_tunnel_ws_inner_plain(ctx, target_port):
    return _ws_tunnel(ctx, target_port, "culvert tunnel ws --inner plain", "ws", "plain")


def start_tunnel_wss(ctx, target_port):
    """culvert terminates TLS itself; nothing in between, so the ends bind the token to
    the outer TLS and leave the TLS-PSK out (--inner auto, the default)."""
    return _ws_tunnel(ctx, target_port, "culvert tunnel wss", "wss")


def start_tunnel_wss_inner_tls(ctx, target_port):
    """wss with the TLS-PSK kept inside as well: every byte encrypted twice."""
    return _ws_tunnel(ctx, target_port, "culvert tunnel wss --inner tls", "wss", "tls")


def start_tunnel_ws_nginx(ctx, target_port):
    """wss:// to nginx, which terminates TLS and passes the upgrade to a ws server."""
    return _ws_tunnel(ctx, target_port, "culvert tunnel wss via nginx", "ws",
                      behind_nginx=True)


# --------------------------------------------------------------------------- proxies
# A proxy's Forwarder has `via`: how clients ask it for the back end ("socks5"; culvert
# proxy also speaks HTTP CONNECT on the same port). The reference, culvert's own
# forward tcp, has none: its clients connect and are at the back end.

def start_proxy_reference(ctx, target_port):
    return _culvert(ctx, target_port, "culvert forward tcp", [])


# The default cap, a quarter of the free descriptors, is ~4,990 under this machine's
# hard limit of 20,000: below the 5,000 idle connections of the memory test.
PROXY_MAX_CONNECTIONS = 6000


def start_culvert_proxy(ctx, target_port):
    _check_culvert(ctx)
    name = "culvert proxy"
    p = spawn([ctx.culvert, "proxy", "--max-connections", str(PROXY_MAX_CONNECTIONS),
               "--log-level", "warning", "127.0.0.1:0"], _log(ctx, name), stdout_pipe=True)
    try:
        port = read_ready_line(p, ctx.start_timeout, lambda x: parse_listening(x, "proxy"))
        wait_listening(port, [p], ctx.start_timeout)
    except BaseException:
        kill_proc(p)
        raise
    fwd = Forwarder(name, port, [p])
    fwd.via = "socks5"
    return fwd


DANTE_CFG = """\
logoutput: {log}
errorlog: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: error
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect
    log: error
}}
"""


def start_dante(ctx, target_port):
    """danted in the foreground with its own config: no authentication, CONNECT from
    and to loopback, errors logged only."""
    danted = "/usr/sbin/danted"
    if not os.access(danted, os.X_OK):
        raise StartError("danted not installed")
    port = free_port()
    cfg = os.path.join(ctx.tmp, "danted.conf")
    with open(cfg, "w") as f:
        f.write(DANTE_CFG.format(port=port, log=_log(ctx, "danted-own")))
    cmd = [danted, "-f", cfg, "-p", os.path.join(ctx.tmp, "danted.pid")]
    fwd = Forwarder("dante", port, [_start_listening(ctx, "dante", cmd, port)])
    fwd.via = "socks5"
    return fwd


def start_microsocks(ctx, target_port):
    """microsocks 1.0.3 (Debian 12) has no -q: it writes a line per connection to its
    log file."""
    port = free_port()
    cmd = ["microsocks", "-i", "127.0.0.1", "-p", str(port)]
    fwd = Forwarder("microsocks", port, [_start_listening(ctx, "microsocks", cmd, port)])
    fwd.via = "socks5"
    return fwd


def start_ssh_dynamic(ctx, target_port):
    """`ssh -N -D`: the SOCKS listener is the ssh client's, sshd connects to the target."""
    fwd = _ssh(ctx, None, "-D", "ssh -D")
    fwd.via = "socks5"
    return fwd


@dataclass
class Tool:
    """One column of a section: what is started and measured side by side with the others."""
    name: str
    # (ctx, target_port) -> Forwarder; None for a setting whose groups start it (Group.start)
    start: callable
    # measurement groups that do not apply to this tool -> shown as "n/a"
    na: set = field(default_factory=set)
    baseline: bool = False  # the "direct" reference
    threads: int = None     # --threads of tunnel server and clients, for Group.start


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

# --------------------------------------------------------------------------- other sections
# (run.py: --only forward,udp,tunnel,compress,tunnel-udp; measures in sections.py)

UDP_TOOLS = [
    Tool("direct", start_direct, baseline=True),
    Tool("culvert", start_culvert_udp),
    Tool("socat", start_socat_udp),
]

_NA_BUT_FIRSTBYTE = {"throughput", "latency", "connrate", "memory"}
TUNNEL_TOOLS = [
    Tool("direct", start_direct, na={"memory"}, baseline=True),
    Tool("culvert tunnel plain", start_tunnel_plain),
    Tool("culvert tunnel plain --mux 0", start_tunnel_plain_dedicated),
    Tool("culvert tunnel plain --mux 0 --pool 0", start_tunnel_plain_pool0, na=_NA_BUT_FIRSTBYTE),
    Tool("culvert tunnel tls", start_tunnel_tls),
    Tool("culvert tunnel tls --mux 0", start_tunnel_tls_dedicated),
    Tool("ssh -R", start_ssh_reverse),
    Tool("haproxy", start_haproxy, na=_NA_BUT_FIRSTBYTE),  # the one-hop reference
]

# The same tunnel set-up with one and with two loops per process, as two tools so that
# run_all interleaves them run by run; the groups that measure them (sections.py) start
# the set-up from `threads`.
THREADS_TOOLS = [
    Tool("culvert --threads 1", None, threads=1),
    Tool("culvert --threads 2", None, threads=2),
]

COMPRESS_TOOLS = [
    Tool("direct", start_direct, baseline=True),
    Tool("culvert tunnel plain", start_tunnel_plain_logged),
    Tool("culvert tunnel plain --compress", start_tunnel_compress),
]

TUNNEL_UDP_TOOLS = [
    Tool("direct", start_direct, baseline=True),
    Tool("culvert tunnel plain", start_tunnel_udp),
]

# The ws section (issue 15): the TLS and plain tunnels the targets compare with, and the
# WebSocket variants, in one run.
WS_TOOLS = [
    Tool("direct", start_direct, baseline=True),
    Tool("culvert tunnel plain", start_tunnel_plain),
    Tool("culvert tunnel tls", start_tunnel_tls),
    Tool("culvert tunnel ws", start_tunnel_ws),
    Tool("culvert tunnel ws --inner plain", start_tunnel_ws_inner_plain),
    Tool("culvert tunnel wss", start_tunnel_wss),
    Tool("culvert tunnel wss --inner tls", start_tunnel_wss_inner_tls),
    Tool("culvert tunnel wss via nginx", start_tunnel_ws_nginx),
]

# The proxy section: culvert's forward tcp as the reference, then the proxies. Only
# culvert proxy speaks HTTP CONNECT.
_NO_HTTP = {"proxy connrate http"}
PROXY_TOOLS = [
    Tool("culvert forward tcp", start_proxy_reference, baseline=True),
    Tool("culvert proxy", start_culvert_proxy),
    Tool("dante", start_dante, na=_NO_HTTP),
    Tool("microsocks", start_microsocks, na=_NO_HTTP),
    Tool("ssh -D", start_ssh_dynamic, na=_NO_HTTP),
]

# forward tcp with and without the admin endpoint, alternating run by run.
ADMIN_TOOLS = [
    Tool("culvert", start_culvert),
    Tool("culvert --admin", start_culvert_admin),
]
