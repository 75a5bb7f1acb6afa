"""Turn raw per-run values into the JSON document, the Markdown tables and the PNG chart."""
import os
import shutil
import subprocess

from benchlib import Failed, best_of, ratio, summarize
from measures import DERIVED, METRICS, NA

SUSPICIOUS_FACTOR = 1.05


def _jsonable(v):
    if isinstance(v, Failed):
        return {"failed": v.reason}
    if v is NA:
        return "n/a"
    return v


def build(raw, notes, tool_names, baseline, meta):
    """raw: {tool: {metric: [value per run]}} -> results dict (what latest.json holds)."""
    res = {**meta, "metrics": {}, "tools": {}, "derived": {}, "ratios_to_direct": {},
           "culvert_vs_best_peer": {}, "flags": []}
    for m in METRICS:
        res["metrics"][m.key] = {"label": m.label, "unit": m.unit,
                                 "higher_is_better": m.higher_better}
    for d_key, d_label, _ in DERIVED:
        res["metrics"][d_key] = {"label": d_label, "unit": "µs", "higher_is_better": False}
    for t in tool_names:
        tm = {}
        for m in METRICS:
            vals = raw.get(t, {}).get(m.key)
            if vals is None:
                continue
            if all(v is NA for v in vals):
                tm[m.key] = {"status": "n/a", "values": ["n/a"] * len(vals)}
                continue
            s = summarize([v for v in vals if v is not NA])
            s["values"] = [_jsonable(v) for v in vals]
            tm[m.key] = s
        res["tools"][t] = {"metrics": tm, "notes": notes.get(t, [])}

    def med(t, k):
        s = res["tools"].get(t, {}).get("metrics", {}).get(k)
        return s["median"] if s and s.get("status") == "ok" else None

    # derived: forwarded minus direct (from medians)
    for d_key, _, src in DERIVED:
        base = med(baseline, src) if baseline else None
        res["derived"][d_key] = {
            t: (None if base is None or med(t, src) is None else med(t, src) - base)
            for t in tool_names if t != baseline}

    # ratios to direct; suspicious throughput
    for m in METRICS:
        if not m.vs_direct:
            continue
        base = med(baseline, m.key) if baseline else None
        res["ratios_to_direct"][m.key] = {t: ratio(med(t, m.key), base)
                                          for t in tool_names if t != baseline}
        if m.suspicious_above_direct:
            for t, r in res["ratios_to_direct"][m.key].items():
                if r is not None and r > SUSPICIOUS_FACTOR:
                    res["tools"][t]["metrics"][m.key]["suspicious"] = True
                    res["flags"].append(f"{t} {m.label}: {r:.2f}x direct from the same run "
                                        f"(> {SUSPICIOUS_FACTOR}x) - suspicious")

    # culvert vs the best peer (peers = everything but direct and culvert variants)
    peers = [t for t in tool_names if t != baseline and not t.startswith("culvert")]
    all_metrics = [(m.key, m.higher_better) for m in METRICS] + \
                  [(d[0], False) for d in DERIVED]
    for key, hb in all_metrics:
        if key in res["derived"]:
            getv = lambda t: res["derived"][key].get(t)  # noqa: E731
        else:
            getv = lambda t: med(t, key)  # noqa: E731
        if "culvert" not in tool_names:
            continue
        if not any(getv(t) is not None for t in tool_names) and not any(
                key in res["tools"][t]["metrics"] for t in tool_names):
            continue  # metric not measured in this invocation (--groups)
        name, best = best_of({p: getv(p) for p in peers}, hb)
        cv = getv("culvert")
        r = ratio(cv, best)
        if key in res["derived"] and cv is not None and best is not None and best <= 0:
            r = None  # a ratio of (possibly negative) differences means nothing
        res["culvert_vs_best_peer"][key] = {"culvert": cv, "best_peer": name,
                                            "best_value": best, "ratio": r,
                                            "higher_is_better": hb}
    return res


# --------------------------------------------------------------------------- markdown

def _cell(res, tool, key):
    m = next(x for x in METRICS if x.key == key)
    s = res["tools"].get(tool, {}).get("metrics", {}).get(key)
    if s is None:
        return "-"
    if s["status"] == "n/a":
        return "n/a"
    if s["status"] == "FAILED":
        return "FAILED"
    f = m.fmt
    txt = f.format(s["median"])
    if s["n_ok"] > 1:
        txt += f" ({f.format(s['min'])}–{f.format(s['max'])})"
    if s.get("n_failed"):
        txt += f" [{s['n_failed']}/{s['n_ok'] + s['n_failed']} runs FAILED]"
    if s.get("suspicious"):
        txt += " ⚠suspicious"
    return txt


def _fmt(v, f="{:.2f}", none="n/a"):
    return none if v is None else f.format(v)


def markdown(res):
    tools = list(res["tools"])
    runs = res["config"]["runs"]
    lines = [f"# culvert benchmark ({'QUICK' if res['config']['quick'] else 'full'})", "",
             f"{res['date']} · {res['machine']['cpu_model']} · {res['machine']['nproc']} cores"
             f" · kernel {res['machine']['kernel']} · load avg at start "
             f"{res['machine']['loadavg_start']}, at end {res['machine'].get('loadavg_end', '?')}",
             "",
             f"Loopback only, one tool at a time. Each cell: median (min–max) over {runs} "
             f"run(s). iperf3 {res['config']['tput_seconds']} s per test; sockperf "
             f"ping-pong {res['config']['lat_seconds']} s (round-trip times); wrk -t1 "
             f"-c{res['config']['wrk_conns']} {res['config']['wrk_seconds']} s with "
             f"`Connection: close` against nginx; memory with {res['config']['mem_conns']} "
             f"idle forwarded connections. Numbers are only comparable within this run.", ""]

    def table(title, keys, extra=None):
        hdr = ["tool"] + [f"{res['metrics'][k]['label']} ({res['metrics'][k]['unit']})"
                          for k in keys] + [h for h, _ in (extra or [])]
        out = [f"## {title}", "", "| " + " | ".join(hdr) + " |",
               "|" + "---|" * len(hdr)]
        for t in tools:
            row = [t] + [_cell(res, t, k) for k in keys] + [fn(t) for _, fn in (extra or [])]
            out.append("| " + " | ".join(row) + " |")
        return out + [""]

    def added(key):
        def fn(t):
            if t not in res["derived"].get(key, {}):
                return "—"
            return _fmt(res["derived"][key][t], "{:+.1f}")
        return fn

    lines += table("Throughput, latency, connection rate",
                   ["tput1_gbps", "tput8_gbps", "rtt_p50_us", "rtt_p99_us", "conn_per_s"],
                   [("added RTT p50 (µs)", added("added_p50_us")),
                    ("added RTT p99 (µs)", added("added_p99_us"))])
    lines += table("Resources",
                   ["cpu_s_per_gb", "rss_idle_mib", "rss_loaded_mib", "kib_per_conn",
                    "pss_kib_per_conn", "sock_mem_mib"])

    # ratios to direct
    rk = list(res["ratios_to_direct"])
    lines += ["## Ratio to direct (median / direct's median)", "",
              "| tool | " + " | ".join(res["metrics"][k]["label"] for k in rk) + " |",
              "|" + "---|" * (len(rk) + 1)]
    for t in tools:
        if t == res["config"].get("baseline"):
            continue
        lines.append("| " + t + " | " + " | ".join(
            _fmt(res["ratios_to_direct"][k].get(t), "{:.2f}x") for k in rk) + " |")
    lines.append("")

    if res["culvert_vs_best_peer"]:
        lines += ["## culvert vs the best peer", "",
                  "| metric | better | culvert | best peer | peer value | culvert / best |",
                  "|---|---|---|---|---|---|"]
        for k, c in res["culvert_vs_best_peer"].items():
            f = next((m.fmt for m in METRICS if m.key == k), "{:+.1f}")
            lines.append(f"| {res['metrics'][k]['label']} ({res['metrics'][k]['unit']}) | "
                         f"{'higher' if c['higher_is_better'] else 'lower'} | "
                         f"{_fmt(c['culvert'], f, 'FAILED/n/a')} | {c['best_peer'] or 'n/a'} | "
                         f"{_fmt(c['best_value'], f)} | {_fmt(c['ratio'], '{:.2f}x')} |")
        lines.append("")

    foot = []
    for t in tools:
        for k, s in res["tools"][t]["metrics"].items():
            for e in dict.fromkeys(s.get("errors", [])):
                foot.append(f"- {t} / {k}: FAILED: {e}")
        for n in dict.fromkeys(res["tools"][t]["notes"]):
            foot.append(f"- {t}: {n}")
    foot += [f"- ⚠ {f}" for f in res["flags"]]
    if foot:
        lines += ["## Failures, flags and notes", ""] + foot + [""]
    lines += [f"Total harness time: {res.get('elapsed_s', 0):.0f} s.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- chart

def chart(res, png_path, workdir, timeout=60):
    """Bar chart (median, min–max error bars) of the chart metrics with gnuplot.
    Returns None on success or a reason string."""
    gp = shutil.which("gnuplot")
    if not gp:
        return "gnuplot not installed"
    tools = list(res["tools"])
    panels = [m for m in METRICS if m.chart]
    plots = []
    for i, m in enumerate(panels):
        dat = os.path.join(workdir, f"chart_{m.key}.dat")
        with open(dat, "w") as f:
            for j, t in enumerate(tools):
                s = res["tools"][t]["metrics"].get(m.key, {})
                if s.get("status") == "ok":
                    f.write(f'{j} "{t}" {s["median"]} {s["min"]} {s["max"]} ""\n')
                else:
                    label = "FAILED" if s.get("status") == "FAILED" else "n/a"
                    f.write(f'{j} "{t}" ? ? ? "{label}"\n')
        better = "higher" if m.higher_better else "lower"
        plots.append(
            f'set title "{m.label} ({m.unit}), {better} is better" noenhanced\n'
            f'set xrange [-0.6:{len(tools) - 0.4}]\nset yrange [0:*]\n'
            f'plot "{dat}" using 1:3:xtic(2) with boxes lc rgb "#4472c4" notitle, '
            f'"" using 1:3:4:5 with yerrorbars lc rgb "black" pt 0 notitle, '
            f'"" using 1:(0):6 with labels offset 0,1 tc rgb "red" notitle')
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    script = "\n".join([
        f'set terminal pngcairo size {cols * 520},{rows * 380} font ",9"',
        f'set output "{png_path}"',
        'set datafile missing "?"', 'set style fill solid 0.8 border -1',
        'set boxwidth 0.6', 'set xtics rotate by -30 noenhanced', 'set grid ytics',
        f'set multiplot layout {rows},{cols} title "culvert bench {res["date"]} '
        f'(median, bars = min–max; missing bar = FAILED or n/a)" noenhanced',
        *plots, "unset multiplot", ""])
    sp = os.path.join(workdir, "chart.gp")
    with open(sp, "w") as f:
        f.write(script)
    try:
        r = subprocess.run([gp, sp], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "gnuplot timed out"
    if r.returncode != 0:
        return "gnuplot failed: " + r.stderr.strip()[-300:]
    return None
