"""Measurements. A measurement group = a back end (started once per group, on
127.0.0.1) + one function `run(ctx, fwd, backend) -> {metric: value}` called once per
(run, tool) with a fresh forwarder in front of the back end. Values are numbers,
Failed(reason) or NA. The metrics a group produces are listed in METRICS.

To add a measurement: write a back end (or reuse one), a run function, and add a
Group(...) to GROUPS and its Metric(...)s to METRICS."""
import os
import sys
import time
from dataclasses import dataclass

from benchlib import (CpuMeter, Failed, MetricsScraper, StartError, free_port,
                      free_port_tcp_udp, kill_proc,
                      parse_closed_line, parse_iperf3_json, parse_iperf3_udp_json,
                      parse_probe_json, parse_sockperf, parse_ss_backlog, parse_wrk, pss_kib,
                      rss_kib, run_cmd, run_cmds, sockstat_tcp_mem_kib, spawn, wait_listening)

HERE = os.path.dirname(os.path.abspath(__file__))


class _NA:
    def __repr__(self):
        return "NA"


NA = _NA()  # metric does not apply to this tool (e.g. CPU of "direct")


# --------------------------------------------------------------------------- back ends

class Backend:
    """A server process on 127.0.0.1:port, restartable on the same port."""
    name = "backend"

    def __init__(self, ctx):
        self.ctx, self.proc, self.port = ctx, None, free_port()

    def cmd(self):
        raise NotImplementedError

    def prepare(self):
        pass

    def start(self):
        self.prepare()
        self.proc = spawn(self.cmd(), os.path.join(self.ctx.tmp, f"{self.name}.log"))
        try:
            wait_listening(self.port, [self.proc], self.ctx.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        kill_proc(self.proc)
        self.proc = None

    def restart(self):
        self.stop()
        self.start()

    def check(self):
        if self.proc is None or self.proc.poll() is not None:
            raise StartError(f"back end {self.name} is not running")

    @property
    def ports(self):
        """The services this back end offers, one port each."""
        return [self.port]


class IperfServer(Backend):
    name = "iperf3-server"

    def cmd(self):
        return ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.port)]


class IperfServers(Backend):
    """Two iperf3 servers, a service for each of two tunnel clients: one iperf3 server
    runs one test at a time."""
    name = "iperf3-servers"

    def __init__(self, ctx):
        self.ctx = ctx
        self.servers = [IperfServer(ctx), IperfServer(ctx)]
        self.port = self.servers[0].port

    def start(self):
        try:
            for s in self.servers:
                s.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        for s in self.servers:
            s.stop()

    def check(self):
        for s in self.servers:
            s.check()

    @property
    def ports(self):
        return [s.port for s in self.servers]


class SockperfServer(Backend):
    name = "sockperf-server"

    def cmd(self):
        return ["sockperf", "sr", "--tcp", "-i", "127.0.0.1", "-p", str(self.port)]


NGINX_CONF = """\
{user}
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log error;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type text/html;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {d}/www;
    }}
}}
"""
SMALL_FILE = "small.html"


class Nginx(Backend):
    name = "nginx"

    def prepare(self):
        d = os.path.join(self.ctx.tmp, "nginx")
        os.makedirs(os.path.join(d, "www"), exist_ok=True)
        with open(os.path.join(d, "www", SMALL_FILE), "w") as f:
            f.write("<html><body>" + "culvert bench " * 40 + "</body></html>\n")  # ~600 B
        self.conf = os.path.join(d, "nginx.conf")
        user = "user root;" if os.geteuid() == 0 else ""
        with open(self.conf, "w") as f:
            f.write(NGINX_CONF.format(d=d, port=self.port, user=user))

    def cmd(self):
        return ["nginx", "-c", self.conf, "-p", os.path.dirname(self.conf)]


class Sink(Backend):
    """Python asyncio sink (bench/memload.py) that reports its open connection count."""
    name = "sink"

    def prepare(self):
        self.status = os.path.join(self.ctx.tmp, "sink.count")

    def cmd(self):
        return [sys.executable, os.path.join(HERE, "memload.py"), "sink",
                "--port", str(self.port), "--status", self.status]

    def count(self):
        try:
            with open(self.status) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def wait_count(self, n, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.count() == n:
                return True
            self.check()
            time.sleep(0.1)
        return False


class UdpIperfServer(IperfServer):
    """iperf3 -s on a port that is free for UDP too (the -u test uses the same number)."""
    name = "iperf3-server-udp"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.port = free_port_tcp_udp()


class ByteServer(Backend):
    """bench/probe.py byte-server: writes one byte on accept, closes."""
    name = "byte-server"

    def cmd(self):
        return [sys.executable, os.path.join(HERE, "probe.py"), "byte-server",
                "--port", str(self.port)]


class SourceServer(Backend):
    """bench/probe.py source: ctx.compress_bytes of text or random per connection."""
    kind = "text"

    @property
    def name(self):
        return f"source-{self.kind}"

    def cmd(self):
        return [sys.executable, os.path.join(HERE, "probe.py"), "source", "--kind",
                self.kind, "--bytes", str(self.ctx.compress_bytes), "--port", str(self.port)]


class TextSource(SourceServer):
    kind = "text"


class RandomSource(SourceServer):
    kind = "random"


# --------------------------------------------------------------------------- run functions

def _iperf_cmd(port, streams, seconds):
    return ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
            "-P", str(streams), "-J", "--connect-timeout", "5000"]


def _iperf_result(rc, out, err):
    """One iperf3 -J run -> parse_iperf3_json's dict; ValueError with the reason."""
    if rc is None:
        raise ValueError("iperf3 timed out")
    try:
        return parse_iperf3_json(out)
    except ValueError as e:
        raise ValueError(f"{e} (rc={rc}{', ' + err.strip()[:200] if err.strip() else ''})")


PROXYCHAINS_CONF = """\
strict_chain
quiet_mode
tcp_read_time_out 15000
tcp_connect_time_out 8000
[ProxyList]
socks5 127.0.0.1 {port}
"""


def proxychains_prefix(ctx, fwd):
    """For a proxy (fwd.via set): the command prefix that runs a program under
    proxychains4 with this proxy as its only hop; () for a forwarder."""
    if not getattr(fwd, "via", None):
        return ()
    conf = os.path.join(ctx.tmp, f"proxychains-{fwd.port}.conf")
    with open(conf, "w") as f:
        f.write(PROXYCHAINS_CONF.format(port=fwd.port))
    return ("proxychains4", "-q", "-f", conf)


def _iperf(ctx, port, streams, prefix=()):
    rc, out, err = run_cmd([*prefix, *_iperf_cmd(port, streams, ctx.tput_seconds)],
                           timeout=ctx.tput_seconds + 25)
    return _iperf_result(rc, out, err)


def run_throughput(ctx, fwd, be):
    """iperf3 1 stream (with CPU accounting of the forwarder) then 8 streams. Through a
    proxy (fwd.via), iperf3 runs under proxychains4 and asks it for the back end."""
    be.restart()  # a fresh iperf3 server: a stuck one must not poison the next tool
    out = {}
    pids = fwd.root_pids()
    prefix = proxychains_prefix(ctx, fwd)
    port = be.port if prefix else fwd.port
    meter = CpuMeter(pids).start() if pids else None
    try:
        r1 = _iperf(ctx, port, 1, prefix)
        out["tput1_gbps"] = r1["bps"] / 1e9
        if meter:
            time.sleep(0.2)  # let the forwarder finish closing the connections
            out["cpu_s_per_gb"] = meter.stop() / (r1["bytes"] / 1e9)
        else:
            out["cpu_s_per_gb"] = NA
    except ValueError as e:
        out["tput1_gbps"] = out["cpu_s_per_gb"] = Failed(e)
    finally:
        if meter:
            meter.stop()
    try:
        out["tput8_gbps"] = _iperf(ctx, port, 8, prefix)["bps"] / 1e9
    except ValueError as e:
        out["tput8_gbps"] = Failed(e)
    return out


def run_latency(ctx, fwd, be):
    be.check()
    cmd = ["sockperf", "pp", "--tcp", "-i", "127.0.0.1", "-p", str(fwd.port),
           "-t", str(ctx.lat_seconds), "--full-rtt"]
    rc, out, err = run_cmd(cmd, timeout=ctx.lat_seconds + 20)
    if rc != 0:
        f = Failed(f"sockperf rc={rc}: {(err or out).strip()[-200:]}")
        return {"rtt_p50_us": f, "rtt_p99_us": f}
    try:
        r = parse_sockperf(out)
    except ValueError as e:
        return {"rtt_p50_us": Failed(e), "rtt_p99_us": Failed(e)}
    return {"rtt_p50_us": r["p50"], "rtt_p99_us": r["p99"]}


def _wrk_cmd(port, conns, seconds):
    return ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s",
            "-H", "Connection: close", f"http://127.0.0.1:{port}/{SMALL_FILE}"]


def run_connrate(ctx, fwd, be):
    be.check()
    rc, out, err = run_cmd(_wrk_cmd(fwd.port, ctx.wrk_conns, ctx.wrk_seconds),
                           timeout=ctx.wrk_seconds + 20)
    if rc != 0:
        return {"conn_per_s": Failed(f"wrk rc={rc}: {(err or out).strip()[-200:]}")}
    try:
        r = parse_wrk(out)
    except ValueError as e:
        return {"conn_per_s": Failed(e)}
    res = {"conn_per_s": r["rps"]}
    if r["errors"]:
        res["_notes"] = [f"wrk reported {r['errors']} errors of {r['requests']} requests"]
    return res


def split_keys(prefix):
    """Metric keys of a load split over a tunnel's public ports (make_run_split_*)."""
    return {"gbps": f"{prefix}_gbps", "conn_per_s": f"{prefix}_conn_per_s",
            "cpu_server": f"{prefix}_cpu_server_s_per_gb", "cpu_all": f"{prefix}_cpu_s_per_gb"}


def make_run_split_iperf(prefix, streams):
    """iperf3 -P `streams` to every public port of the tunnel (fwd.ports) at once for
    ctx.ab_seconds -> the summed throughput, and CPU seconds per GB received of the
    server process (fwd.procs[0]) and of server and clients together."""
    def run_split_iperf(ctx, fwd, be):
        be.restart()
        k = split_keys(prefix)
        keys = (k["gbps"], k["cpu_server"], k["cpu_all"])
        meter = CpuMeter(fwd.root_pids()).start()
        try:
            done = run_cmds([_iperf_cmd(p, streams, ctx.ab_seconds) for p in fwd.ports],
                            timeout=ctx.ab_seconds + 25)
            time.sleep(0.2)  # let the tunnel finish closing the connections
        finally:
            cpu_all = meter.stop()
        try:
            runs = [_iperf_result(*r) for r in done]
        except ValueError as e:
            return {key: Failed(e) for key in keys}
        gb = sum(r["bytes"] for r in runs) / 1e9
        return {k["gbps"]: sum(r["bps"] for r in runs) / 1e9,
                k["cpu_server"]: meter.seconds_of({fwd.procs[0].pid}) / gb,
                k["cpu_all"]: cpu_all / gb}
    return run_split_iperf


def make_run_split_connrate(prefix):
    """wrk to every public port of the tunnel at once for ctx.ab_seconds, ctx.wrk_conns
    connections split evenly over them -> the summed new connections/s."""
    def run_split_connrate(ctx, fwd, be):
        be.check()
        key = split_keys(prefix)["conn_per_s"]
        conns = max(1, ctx.wrk_conns // len(fwd.ports))
        done = run_cmds([_wrk_cmd(p, conns, ctx.ab_seconds) for p in fwd.ports],
                        timeout=ctx.ab_seconds + 20)
        rps, notes = 0.0, []
        for port, (rc, out, err) in zip(fwd.ports, done):
            if rc != 0:
                return {key: Failed(f"wrk to :{port} rc={rc}: {(err or out).strip()[-200:]}")}
            try:
                r = parse_wrk(out)
            except ValueError as e:
                return {key: Failed(f"{e} (port {port})")}
            rps += r["rps"]
            if r["errors"]:
                notes.append(f"wrk to :{port} reported {r['errors']} errors of "
                             f"{r['requests']} requests")
        return {key: rps, "_notes": notes}
    return run_split_connrate


def udp_keys(prefix):
    return [f"{prefix}_sent", f"{prefix}_mbps", f"{prefix}_loss"]


def make_run_udp(rate, length, prefix):
    """iperf3 -u at a fixed offered rate -> sent and delivered Mbit/s, loss %."""
    def run_udp(ctx, fwd, be):
        be.restart()
        keys = udp_keys(prefix)
        cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(fwd.port), "-u", "-b", rate,
               "-l", str(length), "-t", str(ctx.udp_seconds), "-J", "--connect-timeout", "5000"]
        rc, out, err = run_cmd(cmd, timeout=ctx.udp_seconds + 25)
        try:
            if rc is None:
                raise ValueError("iperf3 timed out")
            r = parse_iperf3_udp_json(out)
        except ValueError as e:
            f = Failed(f"{e} (rc={rc}{', ' + err.strip()[:200] if err.strip() else ''})")
            return {k: f for k in keys}
        return {keys[0]: r["sent_bps"] / 1e6, keys[1]: r["bps"] / 1e6, keys[2]: r["loss_pct"]}
    return run_udp


def firstbyte_values(ctx, tool, cmd):
    """Runs a `firstbyte` probe (`cmd`, its program named `tool` in errors) of
    ctx.fb_conns connections -> fb_p50_us and fb_p99_us; both FAILED when the probe
    failed or any connection missed its byte."""
    rc, out, err = run_cmd(cmd, timeout=ctx.fb_conns * 0.1 + 30)
    try:
        if rc != 0:
            raise ValueError(f"{tool} rc={rc}: {(err or out).strip()[-200:]}")
        r = parse_probe_json(out, ("ok", "n"))
        if r["ok"] < r["n"]:
            raise ValueError(f"only {r['ok']}/{r['n']} connections got their byte: "
                             f"{'; '.join(r.get('errors', []))}")
    except ValueError as e:
        return {k: Failed(e) for k in ("fb_p50_us", "fb_p99_us")}
    return {"fb_p50_us": r["p50_us"], "fb_p99_us": r["p99_us"]}


def run_firstbyte(ctx, fwd, be):
    """ctx.fb_conns sequential new connections; connect() start -> first byte."""
    be.check()
    cmd = [sys.executable, os.path.join(HERE, "probe.py"), "firstbyte", "--port",
           str(fwd.port), "--n", str(ctx.fb_conns), "--gap-ms", str(ctx.fb_gap_ms)]
    return firstbyte_values(ctx, "probe", cmd)


def make_run_proxy_connrate(key, kind):
    """New connections/s through a proxy with bench/proxyload.py: each opens, asks the
    proxy (`kind`: socks5 or http CONNECT) for the nginx back end, fetches the small
    file, closes; ctx.wrk_conns in flight for ctx.wrk_seconds. A forwarder (fwd.via
    None) gets the same requests without a handshake."""
    def run_proxy_connrate(ctx, fwd, be):
        be.check()
        via = kind if getattr(fwd, "via", None) else "none"
        cmd = [sys.executable, os.path.join(HERE, "proxyload.py"), "connrate",
               "--port", str(fwd.port), "--via", via, "--target", str(be.port),
               "--path", f"/{SMALL_FILE}", "--conns", str(ctx.wrk_conns),
               "--seconds", str(ctx.wrk_seconds)]
        rc, out, err = run_cmd(cmd, timeout=ctx.wrk_seconds + 30)
        try:
            if rc != 0:
                raise ValueError(f"proxyload rc={rc}: {(err or out).strip()[-200:]}")
            r = parse_probe_json(out, ("ok", "failed", "rate", "errors"))
            if r["ok"] == 0:
                raise ValueError(f"no request completed: {r['errors']}")
        except ValueError as e:
            return {key: Failed(e)}
        res = {key: r["rate"]}
        if r["failed"]:
            res["_notes"] = [f"{key}: {r['failed']} of {r['ok'] + r['failed']} requests "
                             f"failed: {r['errors']}"]
        return res
    return run_proxy_connrate


def run_proxy_firstbyte(ctx, fwd, be):
    """ctx.fb_conns sequential new connections through the proxy (SOCKS5) to the
    byte server: connect() start -> its byte, handshake included."""
    be.check()
    via = "socks5" if getattr(fwd, "via", None) else "none"
    cmd = [sys.executable, os.path.join(HERE, "proxyload.py"), "firstbyte", "--port",
           str(fwd.port), "--via", via, "--target", str(be.port), "--n", str(ctx.fb_conns),
           "--gap-ms", str(ctx.fb_gap_ms)]
    return firstbyte_values(ctx, "proxyload", cmd)


def with_scrape(run):
    """The measurement `run`, with the forwarder's admin endpoint (fwd.admin_port, when
    it has one) scraped once a second while it runs. Every scrape must answer: a
    failed one makes the values FAILED (the row claims a scraped forwarder)."""
    def run_scraped(ctx, fwd, be):
        port = getattr(fwd, "admin_port", None)
        if port is None:
            return run(ctx, fwd, be)
        scraper = MetricsScraper(port).start()
        try:
            vals = run(ctx, fwd, be)
        finally:
            ok, failures = scraper.stop()
        if failures:
            why = Failed(f"admin scrape failed: {failures[0]}")
            return {k: (v if k == "_notes" or v is NA else why) for k, v in vals.items()}
        vals.setdefault("_notes", []).append("/metrics scraped once a second during every "
                                             "measurement, every scrape answered")
        return vals
    return run_scraped


def fetch_keys(kind):
    return [f"{kind}_gbps", f"{kind}_wire_mib", f"{kind}_wire_pct"]


def server_closed_line(log_path, listen_port, timeout=10.0):
    """The last `connection closed` line of a culvert server log for its public port
    `listen_port`, parsed; waits up to timeout for it (it is logged after the relay
    ends). None if none appears."""
    end = time.monotonic() + timeout
    while True:
        found = None
        try:
            with open(log_path, errors="replace") as f:
                for line in f:
                    d = parse_closed_line(line)
                    if d and str(d.get("listen", "")).endswith(f":{listen_port}"):
                        found = d
        except OSError:
            pass
        if found or time.monotonic() > end:
            return found
        time.sleep(0.1)


def make_run_fetch(kind):
    """Download ctx.compress_bytes (text or random, from SourceServer) through the
    forwarder: throughput, and bytes on the tunnel's wire from the server's log."""
    def run_fetch(ctx, fwd, be):
        be.check()
        keys = fetch_keys(kind)
        cmd = [sys.executable, os.path.join(HERE, "probe.py"), "fetch", "--port", str(fwd.port)]
        rc, out, err = run_cmd(cmd, timeout=150)
        try:
            if rc != 0:
                raise ValueError(f"probe rc={rc}: {(err or out).strip()[-200:]}")
            r = parse_probe_json(out, ("bytes", "seconds"))
            if r["bytes"] != ctx.compress_bytes:
                raise ValueError(f"received {r['bytes']} of {ctx.compress_bytes} bytes")
        except ValueError as e:
            return {k: Failed(e) for k in keys}
        res = {keys[0]: r["bytes"] * 8 / r["seconds"] / 1e9}
        log = getattr(fwd, "server_log", None)
        if not log:  # direct: no tunnel, nothing to count
            res[keys[1]] = res[keys[2]] = NA
            return res
        d = server_closed_line(log, fwd.port)
        if d is None:
            res[keys[1]] = res[keys[2]] = Failed("no `connection closed` line in the server log")
            return res
        if d.get("down") != ctx.compress_bytes:
            res[keys[1]] = res[keys[2]] = Failed(
                f"server logged down={d.get('down')}, expected {ctx.compress_bytes}")
            return res
        wire = d.get("wire_down", d["down"])  # no compression: the payload is the wire
        if not isinstance(wire, int):
            res[keys[1]] = res[keys[2]] = Failed(f"unparsable wire_down={wire!r}")
            return res
        res[keys[1]] = wire / 2**20
        res[keys[2]] = 100.0 * wire / ctx.compress_bytes
        return res
    return run_fetch


MEM_KEYS = ("rss_idle_mib", "rss_loaded_mib", "kib_per_conn", "pss_kib_per_conn",
            "sock_mem_mib")


def run_memory(ctx, fwd, be):
    n = ctx.mem_conns
    fail = lambda why: {k: Failed(why) for k in MEM_KEYS}  # noqa: E731
    if not be.wait_count(0, 15):
        return fail(f"sink still has {be.count()} connections from the previous tool")
    pids = fwd.root_pids()
    time.sleep(0.5)
    idle, _ = rss_kib(pids)
    pss_idle = pss_kib(pids)
    sock0 = sockstat_tcp_mem_kib()
    timeout = ctx.mem_timeout
    backlog = listen_backlog(fwd.port)
    batch = max(1, min(100, backlog // 2)) if backlog else 8
    via = ["--socks5-target", str(be.port)] if getattr(fwd, "via", None) == "socks5" else []
    client = spawn([sys.executable, os.path.join(HERE, "memload.py"), "client",
                    "--port", str(fwd.port), "--n", str(n), "--timeout", str(timeout),
                    "--batch", str(batch), "--sink-status", be.status, *via],
                   os.path.join(ctx.tmp, "memload-client.log"), stdout_pipe=True,
                   stdin_pipe=True)
    notes = []
    try:
        line = _readline(client, timeout + 10)
        if not line.startswith("connected"):
            return fail(f"client: {line or 'no answer'} (wanted {n})")
        # the forwarder has accepted all; wait until it also connected all to the sink
        if not be.wait_count(n, timeout):
            return fail(f"sink saw only {be.count()}/{n} forwarded connections")
        time.sleep(1.0)
        loaded, nprocs = rss_kib(pids)
        pss_loaded = pss_kib(pids)
        sock1 = sockstat_tcp_mem_kib()
        if fwd.exited():
            return fail(fwd.exited())
        if nprocs > 1:
            notes.append(f"{nprocs} processes while loaded (sum of their RSS; PSS shown too)")
    finally:
        try:
            client.stdin.write(b"close\n")
            client.stdin.flush()
            client.wait(timeout=30)
        except Exception:
            pass
        kill_proc(client)
    be.wait_count(0, 15)
    return {"rss_idle_mib": idle / 1024, "rss_loaded_mib": loaded / 1024,
            "kib_per_conn": (loaded - idle) / n, "pss_kib_per_conn": (pss_loaded - pss_idle) / n,
            "sock_mem_mib": (sock1 - sock0) / 1024, "_notes": notes}


def listen_backlog(port):
    """Listen backlog of the socket on 127.0.0.1:port (ss's Send-Q), or None."""
    rc, out, _ = run_cmd(["ss", "-Hltn", f"sport = :{port}"], timeout=10)
    if rc != 0:
        return None
    return parse_ss_backlog(out)


def _readline(p, timeout):
    import select
    end, buf, fd = time.monotonic() + timeout, b"", p.stdout.fileno()
    while time.monotonic() < end and b"\n" not in buf:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        elif p.poll() is not None:
            break
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


# --------------------------------------------------------------------------- registry

@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool
    fmt: str = "{:.1f}"
    vs_direct: bool = False   # has a direct baseline -> ratio-to-direct column
    suspicious_above_direct: bool = False  # > 1.05x direct is flagged
    chart: bool = False
    vs_peer: bool = True      # in the "culvert vs the best peer" table


METRICS = [
    Metric("tput1_gbps", "throughput 1 stream", "Gbit/s", True, "{:.2f}", True, True, True),
    Metric("tput8_gbps", "throughput 8 streams", "Gbit/s", True, "{:.2f}", True, True, True),
    Metric("rtt_p50_us", "RTT p50", "µs", False, "{:.1f}", True, chart=True),
    Metric("rtt_p99_us", "RTT p99", "µs", False, "{:.1f}", True),
    Metric("conn_per_s", "connections/s (wrk, Connection: close)", "req/s", True, "{:.0f}",
           True, chart=True),
    Metric("cpu_s_per_gb", "CPU per GB (1 stream)", "CPU-s/GB", False, "{:.2f}", chart=True),
    Metric("rss_idle_mib", "RSS idle", "MiB", False, "{:.1f}"),
    Metric("rss_loaded_mib", "RSS with N idle conns", "MiB", False, "{:.1f}"),
    Metric("kib_per_conn", "RSS per connection", "KiB", False, "{:.2f}"),
    Metric("pss_kib_per_conn", "PSS per connection", "KiB", False, "{:.2f}", chart=True),
    Metric("sock_mem_mib", "kernel TCP socket mem (delta)", "MiB", False, "{:.1f}"),
]
METRIC_BY_KEY = {m.key: m for m in METRICS}

# Derived from medians after all runs: forwarded minus direct.
DERIVED = [
    ("added_p50_us", "added RTT p50 vs direct", "rtt_p50_us"),
    ("added_p99_us", "added RTT p99 vs direct", "rtt_p99_us"),
]


@dataclass
class Group:
    """A measurement: one back end, one run function, the metrics it yields."""
    name: str
    backend: type
    run: callable
    metrics: list
    est_seconds: callable  # estimated wall time of one (run, tool), for the time budget
    in_quick: bool = True  # False: left out of QUICK runs (to keep them < 3 min)
    # (ctx, tool, backend) -> Forwarder, for groups whose set-up is not the tool's own
    # (the tool is a setting, e.g. Tool.threads); None: tool.start(ctx, backend.port)
    start: callable = None


GROUPS = [
    Group("throughput", IperfServer, run_throughput,
          ["tput1_gbps", "tput8_gbps", "cpu_s_per_gb"],
          lambda ctx: 2 * ctx.tput_seconds + 6),
    Group("latency", SockperfServer, run_latency, ["rtt_p50_us", "rtt_p99_us"],
          lambda ctx: ctx.lat_seconds + 3),
    Group("connrate", Nginx, run_connrate, ["conn_per_s"],
          lambda ctx: ctx.wrk_seconds + 3),
    Group("memory", Sink, run_memory, list(MEM_KEYS),
          lambda ctx: 15),
]
