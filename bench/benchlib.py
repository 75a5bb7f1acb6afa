"""Building blocks of the culvert benchmark harness: output parsers, /proc readers,
process management (every started process is tracked and killed on every exit path),
statistics and ratios. No benchmark runs from here; see run.py."""
import atexit
import json
import os
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Failed:
    """A measurement that did not produce a number. Never turned into 0."""

    def __init__(self, reason):
        self.reason = str(reason)[:300]

    def __repr__(self):
        return f"Failed({self.reason!r})"

    def __eq__(self, other):
        return isinstance(other, Failed) and other.reason == self.reason


class StartError(Exception):
    """A forwarder or back end did not come up."""


# --------------------------------------------------------------------------- parsers

def parse_iperf3_json(text):
    """iperf3 -J output -> {'bps': received bits/s, 'bytes': received bytes}."""
    try:
        doc = json.loads(text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"iperf3: not JSON ({e})")
    if isinstance(doc, dict) and doc.get("error"):
        raise ValueError(f"iperf3: {doc['error']}")
    try:
        recv = doc["end"]["sum_received"]
        bps = float(recv["bits_per_second"])
        nbytes = float(recv["bytes"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("iperf3: no end.sum_received in output")
    if bps <= 0 or nbytes <= 0:
        raise ValueError("iperf3: zero bytes received")
    return {"bps": bps, "bytes": nbytes}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_sockperf(text):
    """sockperf pp output -> {'p50': us, 'p99': us, 'avg': us}."""
    clean = _ANSI.sub("", text)
    out = {}
    for key, pct in (("p50", "50.000"), ("p99", "99.000")):
        m = re.search(r"percentile\s+" + re.escape(pct) + r"\s*=\s*([0-9.]+)", clean)
        if not m:
            raise ValueError(f"sockperf: no percentile {pct} in output")
        out[key] = float(m.group(1))
    m = re.search(r"avg-(?:latency|rtt)\s*=\s*([0-9.]+)", clean)
    out["avg"] = float(m.group(1)) if m else None
    m = re.search(r"Total\s+(\d+)\s+observations", clean)
    if m and int(m.group(1)) == 0:
        raise ValueError("sockperf: zero observations")
    return out


def parse_wrk(text):
    """wrk output -> {'rps', 'requests', 'errors'} (errors = socket errors + non-2xx/3xx)."""
    m = re.search(r"Requests/sec:\s*([0-9.]+)", text)
    if not m:
        raise ValueError("wrk: no Requests/sec in output")
    rps = float(m.group(1))
    m = re.search(r"(\d+)\s+requests in", text)
    requests = int(m.group(1)) if m else None
    errors = 0
    m = re.search(r"Socket errors:\s*connect\s+(\d+),\s*read\s+(\d+),\s*write\s+(\d+),\s*timeout\s+(\d+)",
                  text)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if m:
        errors += int(m.group(1))
    if rps <= 0 or requests == 0:
        raise ValueError("wrk: zero requests completed")
    return {"rps": rps, "requests": requests, "errors": errors}


def parse_proc_stat(text):
    """/proc/PID/stat -> dict(ppid, utime, stime, cutime, cstime) (times in clock ticks).
    The comm field may contain spaces and ')' so split after the LAST ')'."""
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); utime is field 14 -> rest[11]
    return {"state": rest[0], "ppid": int(rest[1]), "utime": int(rest[11]),
            "stime": int(rest[12]), "cutime": int(rest[13]), "cstime": int(rest[14]),
            "session": int(rest[3]), "starttime": int(rest[19])}


def parse_status_kib(text, field="VmRSS"):
    """/proc/PID/status -> value of `field` in KiB (None if absent, e.g. zombie)."""
    m = re.search(r"^" + field + r":\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def parse_sockstat_tcp_mem(text):
    """/proc/net/sockstat -> TCP 'mem' in pages."""
    m = re.search(r"^TCP:.*\bmem\s+(\d+)", text, re.M)
    if not m:
        raise ValueError("sockstat: no TCP mem")
    return int(m.group(1))


def parse_udp_ports(text):
    """/proc/net/udp or udp6 text -> set of bound local ports."""
    ports = set()
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and ":" in f[1]:
            ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def parse_listening_ports(text):
    """/proc/net/tcp or tcp6 text -> set of local ports in LISTEN state (0A)."""
    ports = set()
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[3] == "0A":
            ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def parse_ss_backlog(text):
    """`ss -Hltn sport = :PORT` -> listen backlog (Send-Q of the LISTEN line) or None."""
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 4 and f[0] == "LISTEN":
            return int(f[2])
    return None


def parse_ready_line(line, kind="tcp"):
    """culvert ready line -> port. `listening tcp 127.0.0.1:PORT -> TARGET`
    (kind "udp": `listening udp ...`)."""
    m = re.match(r"listening " + kind + r" (\S+):(\d+) -> ", line)
    if not m:
        raise ValueError(f"not a ready line: {line!r}")
    return int(m.group(2))


def parse_tunnel_ready(line):
    """culvert server ready line `listening tunnel 127.0.0.1:PORT` -> port."""
    return parse_listening(line, "tunnel")


def parse_listening(line, kind):
    """A ready line without a target, `listening KIND HOST:PORT` (culvert proxy's
    `listening proxy`, `--admin`'s `listening admin`) -> port."""
    m = re.match(r"listening " + re.escape(kind) + r" (\S+):(\d+)\s*$", line)
    if not m:
        raise ValueError(f"not a `listening {kind}` line: {line!r}")
    return int(m.group(2))


def parse_exposed(line):
    """culvert client ready line `exposed tcp|udp HOST:PORT -> LOCAL` -> (proto, port)."""
    m = re.match(r"exposed (tcp|udp) (\S+):(\d+) -> \S+", line)
    if not m:
        raise ValueError(f"not an exposed line: {line!r}")
    return m.group(1), int(m.group(3))


def parse_iperf3_udp_json(text):
    """iperf3 -u -J output -> {'sent_bps', 'bps' (delivered), 'loss_pct', 'packets',
    'lost'}: the receiver's view (end.sum_received, iperf3 >= 3.10; else end.sum)."""
    try:
        doc = json.loads(text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"iperf3: not JSON ({e})")
    if isinstance(doc, dict) and doc.get("error"):
        raise ValueError(f"iperf3: {doc['error']}")
    try:
        end = doc["end"]
        recv = end.get("sum_received") or end["sum"]
        sent = end.get("sum_sent") or end["sum"]
        out = {"bps": float(recv["bits_per_second"]), "loss_pct": float(recv["lost_percent"]),
               "packets": int(recv["packets"]), "lost": int(recv["lost_packets"]),
               "sent_bps": float(sent["bits_per_second"])}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError("iperf3: no UDP end summary in output")
    if out["packets"] <= 0:
        raise ValueError("iperf3: no packets sent")
    if out["bps"] <= 0:
        raise ValueError(f"iperf3: nothing delivered ({out['lost']}/{out['packets']} lost)")
    return out


_LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_closed_line(line):
    """culvert text log line `info connection closed k=v ...` -> {k: v} (ints where the
    value is a number), or None when the line is not a `connection closed` line."""
    m = re.search(r"\bconnection closed\b(.*)$", line)
    if not m:
        return None
    out = {}
    for k, v in _LOGFMT.findall(m.group(1)):
        if v.startswith('"'):
            v = v[1:-1]
        out[k] = int(v) if v.isdigit() else v
    return out


def parse_probe_json(text, need):
    """Last JSON line of a bench/probe.py run -> dict; ValueError if a key is missing."""
    for line in reversed(text.strip().splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            missing = [k for k in need if k not in doc]
            if missing:
                raise ValueError(f"probe: {doc.get('error') or doc.get('errors') or 'missing ' + ', '.join(missing)}")
            return doc
    raise ValueError(f"probe: no JSON in output {text.strip()[-200:]!r}")


# --------------------------------------------------------------------------- /proc readers

def _read(path):
    with open(path) as f:
        return f.read()


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _children(pid):
    """Direct children from /proc/PID/task/*/children; None if the kernel lacks it."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out += [int(x) for x in _read(f"/proc/{pid}/task/{tid}/children").split()]
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue
            return None
        except OSError:
            continue
    return out


def descendants(root_pids):
    """All live descendants of the given pids (not including them)."""
    out, stack, seen = [], list(root_pids), set(root_pids)
    children_map = None
    while stack:
        pid = stack.pop()
        kids = _children(pid)
        if kids is None:  # no children files: build the map from every ppid once
            if children_map is None:
                children_map = {}
                for p in all_pids():
                    try:
                        pp = parse_proc_stat(_read(f"/proc/{p}/stat"))["ppid"]
                    except (OSError, ValueError, IndexError):
                        continue
                    children_map.setdefault(pp, []).append(p)
            kids = children_map.get(pid, [])
        for c in kids:
            if c not in seen:
                seen.add(c)
                out.append(c)
                stack.append(c)
    return out


def tree_pids(root_pids):
    """The roots, their live descendants, and every process in the roots' sessions
    (each tool is started in a session of its own). The session catches children that
    a forking tool double-forks away (redir's are re-parented to init), the descendants
    catch those that call setsid() (sshd's)."""
    roots = list(root_pids)
    members = roots + descendants(roots)
    sids = set(roots)
    seen = set(members)
    extra = []
    for pid in all_pids():
        if pid in seen:
            continue
        try:
            if parse_proc_stat(_read(f"/proc/{pid}/stat"))["session"] in sids:
                extra.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    if extra:
        members += extra + [d for d in descendants(extra) if d not in seen]
    return list(dict.fromkeys(members))


def _cpu_sample(root_pids):
    """{(pid, starttime): own utime+stime ticks} for the tool's processes (tree_pids)."""
    out = {}
    for pid in tree_pids(root_pids):
        try:
            s = parse_proc_stat(_read(f"/proc/{pid}/stat"))
        except (OSError, ValueError, IndexError):
            continue
        out[(pid, s["starttime"])] = s["utime"] + s["stime"]
    return out


class CpuMeter:
    """CPU seconds used by a process tree between start() and stop().

    Sums each process's OWN utime+stime, polled every `interval` s in a thread, so a
    per-connection child that exits still counts up to its last sample even when its
    parent ignores SIGCHLD (auto-reaped children never reach the parent's cutime).
    cutime/cstime are deliberately not used: they would count reaped children twice.
    A child's last < interval s of life can be missed."""

    def __init__(self, root_pids, interval=0.2):
        import threading
        self.roots, self.interval = list(root_pids), interval
        self.first, self.last = {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _take(self):
        for k, v in _cpu_sample(self.roots).items():
            self.first.setdefault(k, 0)  # processes born after start() begin at 0
            self.last[k] = v

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._take()

    def start(self):
        self.first = _cpu_sample(self.roots)
        self.last = dict(self.first)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._take()
        return sum(self.last[k] - self.first[k] for k in self.last) / CLK_TCK

    def seconds_of(self, pids):
        """CPU seconds of just the processes `pids` (of those measured), up to stop()."""
        return sum(self.last[k] - self.first[k] for k in self.last if k[0] in pids) / CLK_TCK


def check_metrics_text(status, body):
    """One /metrics answer -> None when it is a Prometheus text page of culvert's, else
    the reason."""
    if status != 200:
        return f"HTTP {status}"
    if not re.search(r"^culvert_\w+", body, re.M):
        return "no culvert_ metric in the page"
    return None


class MetricsScraper:
    """GET http://127.0.0.1:PORT/metrics every `interval` s in a thread, the first at
    once, like a Prometheus server; stop() -> (answered, [reasons of failed ones])."""

    def __init__(self, port, interval=1.0):
        import threading
        self.port, self.interval = port, interval
        self.ok, self.failures = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _scrape(self):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            why = check_metrics_text(r.status, r.read().decode(errors="replace"))
        except (OSError, http.client.HTTPException) as e:
            why = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        if why:
            self.failures.append(why)
        else:
            self.ok += 1

    def _loop(self):
        self._scrape()
        while not self._stop.wait(self.interval):
            self._scrape()

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        return self.ok, self.failures


def rss_kib(root_pids, include_children=True):
    """Sum of VmRSS over the tool's processes (tree_pids) in KiB, plus process count."""
    pids = tree_pids(root_pids) if include_children else list(root_pids)
    total, n = 0, 0
    for pid in pids:
        try:
            v = parse_status_kib(_read(f"/proc/{pid}/status"))
        except OSError:
            continue
        if v is not None:
            total += v
            n += 1
    return total, n


def pss_kib(root_pids, include_children=True):
    """Sum of Pss (proportional set size; shared pages split between sharers) in KiB."""
    pids = tree_pids(root_pids) if include_children else list(root_pids)
    total = 0
    for pid in pids:
        try:
            v = parse_status_kib(_read(f"/proc/{pid}/smaps_rollup"), "Pss")
        except OSError:
            continue
        if v is not None:
            total += v
    return total


def sockstat_tcp_mem_kib():
    return parse_sockstat_tcp_mem(_read("/proc/net/sockstat")) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _proc_net_ports(table, parse):
    """The ports `parse` finds in /proc/net/`table` and its IPv6 twin (one may be absent)."""
    ports = set()
    for p in (f"/proc/net/{table}", f"/proc/net/{table}6"):
        try:
            ports |= parse(_read(p))
        except OSError:
            pass
    return ports


def listening_ports():
    return _proc_net_ports("tcp", parse_listening_ports)


def udp_ports():
    return _proc_net_ports("udp", parse_udp_ports)


def wait_udp_bound(port, procs, timeout):
    """Wait until a UDP socket is bound to `port`; StartError if a proc exits first."""
    _wait_port(port, procs, timeout, udp_ports, "binding UDP", f"UDP port {port} not bound")


def free_port_tcp_udp():
    """A port free for both TCP and UDP on 127.0.0.1 (iperf3 -u needs both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise StartError("no port free for both TCP and UDP")


def free_port():
    """A free high port on 127.0.0.1 (bind port 0, read it, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- processes

_LIVE = {}  # pid -> Popen; everything started and not yet reaped


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def spawn(cmd, log_path=None, stdout_pipe=False, stdin_pipe=False, cwd=None, env=None):
    """Start a tracked process in its own session (so its group can be killed).
    stderr (and stdout unless piped) go to log_path, never to an unread pipe."""
    log = open(log_path or os.devnull, "ab")
    try:
        p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log, stderr=log,
            start_new_session=True, preexec_fn=_raise_nofile, cwd=cwd, env=env)
    finally:
        log.close()
    p.log_path = log_path
    _LIVE[p.pid] = p
    return p


def kill_proc(p, grace=3.0):
    """SIGTERM the process, its process group and every descendant (by pid); SIGKILL
    whatever is still alive after `grace` seconds; reap."""
    if p is None:
        return
    try:
        targets = tree_pids([p.pid])
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except OSError:
                pass
            for pid in targets[1:]:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            end = time.monotonic() + grace
            while time.monotonic() < end:
                if p.poll() is not None and not any(_alive(x) for x in targets[1:]):
                    break
                time.sleep(0.05)
            if p.poll() is not None and not any(_alive(x) for x in targets[1:]):
                break
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    finally:
        for f in (p.stdin, p.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        _LIVE.pop(p.pid, None)


def _alive(pid):
    try:
        st = parse_proc_stat(_read(f"/proc/{pid}/stat"))["state"]
        return st != "Z"
    except (OSError, ValueError, IndexError):
        return False


def kill_all():
    for p in list(_LIVE.values()):
        kill_proc(p, grace=1.0)


atexit.register(kill_all)


def install_signal_handlers():
    """Turn SIGTERM/SIGHUP into SystemExit so finally blocks and atexit run."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)


def run_cmd(cmd, timeout, cwd=None):
    """Run to completion with a timeout; returns (rc, stdout, stderr). Kills the whole
    group on timeout. rc is None on timeout."""
    return run_cmds([cmd], timeout, cwd)[0]


def run_cmds(cmds, timeout, cwd=None):
    """Run the commands at the same time, each to completion within one shared timeout
    -> [(rc, stdout, stderr)] in their order (rc None: killed at the timeout). Outputs
    are read one process after the other; one whose pipe fills meanwhile just waits."""
    procs = []
    try:
        for cmd in cmds:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd,
                                 preexec_fn=_raise_nofile, text=True)
            _LIVE[p.pid] = p
            procs.append(p)
        end = time.monotonic() + timeout
        results = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(0.0, end - time.monotonic()))
                results.append((p.returncode, out, err))
            except subprocess.TimeoutExpired:
                _killpg(p)
                out, err = p.communicate()
                results.append((None, out, err))
        return results
    finally:
        for p in procs:  # an exception (SIGTERM) may leave some running
            if p.poll() is None:
                _killpg(p)
                p.wait()
            _LIVE.pop(p.pid, None)


def _killpg(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass


def tail(path, n=400):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace").strip().replace("\n", " | ")
    except (OSError, TypeError):
        return ""


def wait_listening(port, procs, timeout):
    """Wait until `port` is in LISTEN state; StartError if any proc exits first."""
    _wait_port(port, procs, timeout, listening_ports, "listening", f"port {port} not listening")


def _wait_port(port, procs, timeout, ports, doing, missing):
    """Polls until `port` is among `ports()`; StartError saying a proc exited before
    `doing`, or `missing` after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise StartError(f"exited with status {p.returncode} before {doing}"
                                 + (f": {tail(p.log_path)}" if tail(p.log_path) else ""))
        if port in ports():
            return
        time.sleep(0.05)
    raise StartError(f"{missing} after {timeout:g}s")


def read_ready_line(p, timeout, parse=parse_ready_line):
    """Read culvert's ready line from p.stdout within timeout -> parse(line)."""
    return parse(read_lines(p, 1, timeout)[0])


def read_lines(p, n, timeout):
    """Read n lines from p.stdout within timeout (StartError otherwise). Bytes after
    the n-th line stay unread in the pipe buffer, which is never read again: the tools
    print their ready lines and then log to stderr only."""
    end = time.monotonic() + timeout
    buf = b""
    fd = p.stdout.fileno()
    while time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], max(0.0, min(0.2, end - time.monotonic())))
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            if buf.count(b"\n") >= n:
                return [x.decode(errors="replace") for x in buf.split(b"\n")[:n]]
        elif p.poll() is not None:
            break
    try:  # stdout closed: the process is exiting; give it a moment to be reaped
        p.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass
    if p.returncode is not None:
        raise StartError(f"exited with status {p.returncode} without a ready line"
                         + (f": {tail(p.log_path)}" if tail(p.log_path) else ""))
    raise StartError(f"no ready line within {timeout:g}s")


# --------------------------------------------------------------------------- statistics

def summarize(values):
    """values: list of float | Failed -> dict. status FAILED only if no run succeeded."""
    ok = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    fails = [v.reason for v in values if isinstance(v, Failed)]
    if not ok:
        return {"status": "FAILED", "median": None, "min": None, "max": None,
                "n_ok": 0, "n_failed": len(fails), "errors": fails}
    return {"status": "ok", "median": statistics.median(ok), "min": min(ok), "max": max(ok),
            "n_ok": len(ok), "n_failed": len(fails), "errors": fails}


def ratio(a, b):
    """a/b, or None when either is missing/failed or b is 0. Never falls back to 0/1."""
    if a is None or b is None or isinstance(a, Failed) or isinstance(b, Failed):
        return None
    if b == 0:
        return None
    return a / b


def best_of(values, higher_better):
    """values: {name: number|None} -> (name, value) of the best, or (None, None)."""
    cand = [(n, v) for n, v in values.items() if v is not None]
    if not cand:
        return None, None
    return (max if higher_better else min)(cand, key=lambda nv: nv[1])
