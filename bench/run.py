#!/usr/bin/env python3
"""culvert benchmark harness: `make bench` (full) or `make bench QUICK=1`.

Measures on loopback, one tool at a time: direct, culvert, socat, haproxy, rinetd,
redir and ssh -L. Writes bench/results/latest.{md,json,png}. See bench/README.md."""
import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import Failed, StartError, install_signal_handlers, kill_all, run_cmd  # noqa: E402
from measures import GROUPS, NA  # noqa: E402
import report  # noqa: E402
from tools import EXTRA_TOOLS, TOOLS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# binary -> Debian package; installed only when missing
PEERS = {"iperf3": "iperf3", "sockperf": "sockperf", "wrk": "wrk", "nginx": "nginx",
         "socat": "socat", "haproxy": "haproxy", "rinetd": "rinetd", "redir": "redir",
         "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
         "gnuplot": "gnuplot-nox"}
# services a fresh apt install may start; we stop and disable them again
SERVICES = {"nginx": "nginx", "haproxy": "haproxy", "rinetd": "rinetd",
            "openssh-server": "ssh"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def which(b):
    return shutil.which(b) or shutil.which(b, path="/usr/sbin:/sbin:/usr/local/sbin")


def ensure_peers():
    missing = sorted({pkg for b, pkg in PEERS.items() if not which(b)})
    if not missing:
        return
    log(f"installing missing peers from apt: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd, t in ((["apt-get", "update", "-qq"], 300),
                   (["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                    900)):
        try:
            r = subprocess.run(cmd, env=env, timeout=t, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                log(f"warning: {' '.join(cmd[:2])} failed: {r.stderr.strip()[-300:]}")
        except (OSError, subprocess.TimeoutExpired) as e:
            log(f"warning: {' '.join(cmd[:2])}: {e}")
    # a package install may have started the system service: stop and disable it
    for pkg in missing:
        svc = SERVICES.get(pkg)
        if not svc:
            continue
        for cmd in (["systemctl", "stop", svc], ["systemctl", "disable", svc],
                    ["service", svc, "stop"]):
            if shutil.which(cmd[0]):
                try:
                    subprocess.run(cmd, timeout=30, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
                except (OSError, subprocess.TimeoutExpired):
                    pass


def machine_info():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for pkg in sorted(set(PEERS.values())):
        rc, out, _ = run_cmd(["dpkg-query", "-W", "-f=${Version}", pkg], timeout=10)
        versions[pkg] = out.strip() if rc == 0 else None
    rc, out, _ = run_cmd(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], timeout=10)
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu_model": cpu,
            "loadavg_start": open("/proc/loadavg").read().split()[0],
            "peer_versions": versions, "culvert_commit": out.strip() if rc == 0 else None}


def run_all(ctx, tools, groups, runs, deadline):
    """-> raw {tool: {metric: [value per run]}}, notes {tool: [str]}"""
    raw = {t.name: {} for t in tools}
    notes = {t.name: [] for t in tools}

    def record(tool, values):
        for k, v in values.items():
            if k == "_notes":
                notes[tool].extend(v)
            else:
                raw[tool].setdefault(k, []).append(v)

    for g in groups:
        active = [t for t in tools if g.name not in t.na]
        for t in tools:
            if g.name in t.na:
                for _ in range(runs):
                    record(t.name, {k: NA for k in g.metrics})
        log(f"== {g.name}")
        be = g.backend(ctx)
        try:
            try:
                be.start()
            except StartError as e:
                for t in active:
                    for _ in range(runs):
                        record(t.name, {k: Failed(f"back end {be.name}: {e}") for k in g.metrics})
                continue
            for r in range(runs):
                for t in active:  # round-robin over tools, so drift hits all alike
                    if time.monotonic() + g.est_seconds(ctx) > deadline:
                        record(t.name, {k: Failed("skipped: time budget exhausted")
                                        for k in g.metrics})
                        continue
                    t0 = time.monotonic()
                    vals = measure_one(ctx, g, t, be)
                    record(t.name, vals)
                    shown = ", ".join(
                        f"{k}={'FAILED' if isinstance(v, Failed) else 'n/a' if v is NA else f'{v:.3g}'}"
                        for k, v in vals.items() if k != "_notes")
                    log(f"   run {r + 1}/{runs} {t.name:<10} {shown}  [{time.monotonic() - t0:.1f}s]")
        finally:
            be.stop()
    return raw, notes


def measure_one(ctx, g, tool, be):
    """Start the forwarder, run one measurement, stop it. Never raises."""
    fwd = None
    try:
        try:
            fwd = tool.start(ctx, be.port)
        except StartError as e:
            return {k: Failed(f"{tool.name} did not start: {e}") for k in g.metrics}
        if not tool.baseline and fwd.port == be.port:
            return {k: Failed("forwarder port equals back-end port") for k in g.metrics}
        vals = g.run(ctx, fwd, be)
        died = fwd.exited()
        if died:
            vals = {k: (v if k == "_notes" or v is NA else Failed(died)) for k, v in vals.items()}
        for k in g.metrics:
            vals.setdefault(k, Failed("no value produced"))
        return vals
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a broken measurement must not stop the others
        return {k: Failed(f"{type(e).__name__}: {e}") for k in g.metrics}
    finally:
        if fwd:
            fwd.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 run, short tests (< 3 min)")
    ap.add_argument("--runs", type=int, help="repetitions (default 2, QUICK 1)")
    ap.add_argument("--tools", help="comma-separated tool names (default: all standard; "
                    f"extra: {', '.join(t.name for t in EXTRA_TOOLS)})")
    ap.add_argument("--groups", help="comma-separated: " + ", ".join(g.name for g in GROUPS))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--culvert", default=os.environ.get(
        "CULVERT_BIN", os.path.join(ROOT, ".build", "release", "culvert")))
    ap.add_argument("--budget", type=float, help="seconds; later measurements are FAILED "
                    "as 'skipped' past it (default 840, QUICK 150)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get missing peers")
    ap.add_argument("--mem-conns", type=int, help="idle connections for the memory test "
                    "(default 7000, QUICK 2000)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    a = ap.parse_args(argv)

    install_signal_handlers()
    t_start = time.monotonic()
    q = a.quick
    runs = a.runs or (1 if q else 2)
    budget = a.budget or (150 if q else 840)
    all_tools = TOOLS + EXTRA_TOOLS
    if a.tools:
        want = [x.strip() for x in a.tools.split(",")]
        tools = [t for t in all_tools if t.name in want]
        unknown = set(want) - {t.name for t in tools}
        if unknown:
            ap.error(f"unknown tools: {', '.join(sorted(unknown))}")
        tools.sort(key=lambda t: want.index(t.name))
    else:
        tools = list(TOOLS)
    groups = [g for g in GROUPS if not a.groups or g.name in a.groups.split(",")]
    baseline = next((t.name for t in tools if t.baseline), None)

    if not a.no_install:
        ensure_peers()
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="culvert-bench-")
    if not a.keep_tmp:  # holds throwaway ssh keys and logs; registered after kill_all
        atexit.register(shutil.rmtree, tmp, True)
    ctx = SimpleNamespace(
        tmp=tmp, culvert=os.path.abspath(a.culvert), start_timeout=10.0,
        tput_seconds=3 if q else 10, lat_seconds=2 if q else 5,
        wrk_seconds=2 if q else 5, wrk_conns=50,
        mem_conns=a.mem_conns or (2000 if q else 7000), mem_timeout=60)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "config": {"quick": q, "runs": runs, "tput_seconds": ctx.tput_seconds,
                       "lat_seconds": ctx.lat_seconds, "wrk_seconds": ctx.wrk_seconds,
                       "wrk_conns": ctx.wrk_conns, "mem_conns": ctx.mem_conns,
                       "budget_s": budget, "baseline": baseline,
                       "culvert_bin": ctx.culvert,
                       "tools": [t.name for t in tools], "groups": [g.name for g in groups]}}
    log(f"culvert bench: {'QUICK' if q else 'full'}, {runs} run(s), tools: "
        f"{', '.join(t.name for t in tools)}; temp dir {tmp}")
    try:
        raw, notes = run_all(ctx, tools, groups, runs, t_start + budget)
    finally:
        kill_all()
    meta["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[0]
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    res = report.build(raw, notes, [t.name for t in tools], baseline, meta)
    md = report.markdown(res)
    png = os.path.join(a.out, "latest.png")
    why = report.chart(res, png, tmp)
    if why:
        log(f"chart not written: {why}")
        res["chart"] = {"failed": why}
    else:
        res["chart"] = "latest.png"
        md += "\n![chart](latest.png)\n"
    with open(os.path.join(a.out, "latest.json"), "w") as f:
        json.dump(res, f, indent=1, ensure_ascii=False)
    with open(os.path.join(a.out, "latest.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {a.out}/latest.md, latest.json{'' if why else ', latest.png'} "
        f"in {res['elapsed_s']:.0f} s" + (f"; logs in {tmp}" if a.keep_tmp else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
