#!/usr/bin/env python3
"""culvert benchmark harness: `make bench` (full) or `make bench QUICK=1`.

Measures on loopback, one tool at a time, in sections (sections.py): TCP forwarders
(direct, culvert, socat, haproxy, rinetd, redir, ssh -L), UDP forwarders, tunnels
(culvert server+client plain/TLS vs ssh -R), compression, UDP through the tunnel,
proxies (culvert proxy vs dante, microsocks, ssh -D), forward tcp with --admin.
Writes bench/results/latest.{md,json,png}. See bench/README.md."""
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
from measures import NA  # noqa: E402
import report  # noqa: E402
from sections import SECTIONS  # noqa: E402
from tools import EXTRA_TOOLS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# binary -> Debian package; installed only when missing
PEERS = {"iperf3": "iperf3", "sockperf": "sockperf", "wrk": "wrk", "nginx": "nginx",
         "socat": "socat", "haproxy": "haproxy", "rinetd": "rinetd", "redir": "redir",
         "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
         "gnuplot": "gnuplot-nox", "danted": "dante-server", "microsocks": "microsocks",
         "proxychains4": "proxychains4"}
# services a fresh apt install may start; we stop and disable them again
SERVICES = {"nginx": "nginx", "haproxy": "haproxy", "rinetd": "rinetd",
            "openssh-server": "ssh", "dante-server": "danted", "microsocks": "microsocks"}


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
            fwd = g.start(ctx, tool, be) if g.start else tool.start(ctx, be.port)
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


SECTION_CTX_KEYS = ("tput_seconds", "lat_seconds", "wrk_seconds", "wrk_conns", "mem_conns",
                    "fb_conns", "fb_gap_ms", "udp_seconds", "compress_bytes", "ab_seconds")


def section_ctx(ctx, sec, quick, mem_conns_flag=None):
    c = SimpleNamespace(**vars(ctx))
    for k, v in sec.ctx.get("quick" if quick else "full", {}).items():
        setattr(c, k, v)
    if mem_conns_flag and sec.name == "forward":
        c.mem_conns = mem_conns_flag
    return c


def select(a, ap):
    """-> [(Section, [Tool], [Group])] after --only, --tools, --groups."""
    only = [x.strip() for x in a.only.split(",")] if a.only else [s.name for s in SECTIONS]
    bad = set(only) - {s.name for s in SECTIONS}
    if bad:
        ap.error(f"unknown sections: {', '.join(sorted(bad))} "
                 f"(have: {', '.join(s.name for s in SECTIONS)})")
    want_t = [x.strip() for x in a.tools.split(",")] if a.tools else None
    want_g = [x.strip() for x in a.groups.split(",")] if a.groups else None
    out, seen_t, seen_g = [], set(), set()
    for sec in SECTIONS:
        if sec.name not in only:
            continue
        pool = sec.tools + (EXTRA_TOOLS if sec.name == "forward" else [])
        if want_t:
            tl = sorted([t for t in pool if t.name in want_t], key=lambda t: want_t.index(t.name))
        else:
            tl = list(sec.tools)
        gl = [g for g in sec.groups if (not want_g or g.name in want_g)
              and (g.in_quick or not getattr(a, "quick", False) or want_g)]
        seen_t |= {t.name for t in pool}
        seen_g |= {g.name for g in sec.groups}
        if tl and gl:
            out.append((sec, tl, gl))
    if want_t and set(want_t) - seen_t:
        ap.error(f"unknown tools: {', '.join(sorted(set(want_t) - seen_t))}")
    if want_g and set(want_g) - seen_g:
        ap.error(f"unknown groups: {', '.join(sorted(set(want_g) - seen_g))}")
    if not out:
        ap.error("nothing selected")
    return out


def default_budget(chosen, quick):
    """Seconds for the selected sections: the base budget, which the five older sections
    fit in, plus what each newer section adds (Section.budget)."""
    return (170 if quick else 880) + sum(sec.budget[1 if quick else 0] for sec, _, _ in chosen)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 run, short tests (< 3 min)")
    ap.add_argument("--runs", type=int, help="repetitions (default 2, QUICK 1)")
    ap.add_argument("--only", help="comma-separated sections: "
                    + ", ".join(s.name for s in SECTIONS) + " (default: all)")
    ap.add_argument("--tools", help="comma-separated tool names, within the selected "
                    "sections (default: each section's standard set; extra: "
                    f"{', '.join(t.name for t in EXTRA_TOOLS)})")
    ap.add_argument("--groups", help="comma-separated measurement groups, within the "
                    "selected sections: " + ", ".join(dict.fromkeys(
                        g.name for s in SECTIONS for g in s.groups)))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--culvert", default=os.environ.get(
        "CULVERT_BIN", os.path.join(ROOT, ".build", "release", "culvert")))
    ap.add_argument("--budget", type=float, help="seconds; later measurements are FAILED "
                    "as 'skipped' past it (default 880, QUICK 170, plus what the newer "
                    "sections add when they run: "
                    + ", ".join(f"{s.name} {s.budget[0]}/{s.budget[1]}" for s in SECTIONS
                                if any(s.budget)) + ")")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get missing peers")
    ap.add_argument("--mem-conns", type=int, help="idle connections for the forward memory "
                    "test (default 7000, QUICK 1000; the tunnel section uses 5000, QUICK 2000)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    a = ap.parse_args(argv)

    install_signal_handlers()
    t_start = time.monotonic()
    q = a.quick
    runs = a.runs or (1 if q else 2)
    chosen = select(a, ap)
    budget = a.budget or default_budget(chosen, q)

    if not a.no_install:
        ensure_peers()
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="culvert-bench-")
    if not a.keep_tmp:  # holds throwaway ssh keys and logs; registered after kill_all
        atexit.register(shutil.rmtree, tmp, True)
    ctx = SimpleNamespace(
        tmp=tmp, culvert=os.path.abspath(a.culvert), start_timeout=10.0,
        tput_seconds=1 if q else 5, lat_seconds=1 if q else 3,
        wrk_seconds=1 if q else 3, wrk_conns=50, ab_seconds=1 if q else 2,
        mem_conns=1000 if q else 7000, mem_timeout=60,
        fb_conns=500, fb_gap_ms=2.0, udp_seconds=3, compress_bytes=256 * 2**20)
    fwd = next((x for x in chosen if x[0].name == "forward"), None)
    fctx = section_ctx(ctx, fwd[0], q, a.mem_conns) if fwd else ctx
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "config": {"quick": q, "runs": runs, "tput_seconds": fctx.tput_seconds,
                       "lat_seconds": fctx.lat_seconds, "wrk_seconds": fctx.wrk_seconds,
                       "wrk_conns": fctx.wrk_conns, "mem_conns": fctx.mem_conns,
                       "budget_s": budget,
                       "baseline": next((t.name for t in fwd[1] if t.baseline), None)
                       if fwd else None,
                       "culvert_bin": ctx.culvert,
                       "sections": [s.name for s, _, _ in chosen],
                       "tools": [t.name for t in fwd[1]] if fwd else [],
                       "groups": [g.name for g in fwd[2]] if fwd else []}}
    log(f"culvert bench: {'QUICK' if q else 'full'}, {runs} run(s), sections: "
        f"{', '.join(s.name for s, _, _ in chosen)}; temp dir {tmp}")
    results = []
    try:
        for sec, tl, gl in chosen:
            sctx = section_ctx(ctx, sec, q, a.mem_conns)
            log(f"### section {sec.name}: {', '.join(t.name for t in tl)}  "
                f"[{time.monotonic() - t_start:.0f} s]")
            raw, notes = run_all(sctx, tl, gl, runs, t_start + budget)
            baseline = next((t.name for t in tl if t.baseline), None)
            results.append((sec, raw, notes, [t.name for t in tl], baseline,
                            {k: getattr(sctx, k) for k in SECTION_CTX_KEYS}))
    finally:
        kill_all()
    meta["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[0]
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    res = report.build_all(results, meta)
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
