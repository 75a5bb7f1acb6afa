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


def build(raw, notes, tool_names, baseline, meta, metrics=None, derived=None):
    """raw: {tool: {metric: [value per run]}} -> results dict (what latest.json holds).
    metrics/derived: of the section (default: the forward section's)."""
    metrics = METRICS if metrics is None else metrics
    derived = DERIVED if derived is None else derived
    res = {**meta, "metrics": {}, "tools": {}, "derived": {}, "ratios_to_direct": {},
           "culvert_vs_best_peer": {}, "vs_best_peer": {}, "flags": []}
    for m in metrics:
        res["metrics"][m.key] = {"label": m.label, "unit": m.unit,
                                 "higher_is_better": m.higher_better, "fmt": m.fmt}
    for d_key, d_label, _ in derived:
        res["metrics"][d_key] = {"label": d_label, "unit": "µs", "higher_is_better": False,
                                 "fmt": "{:+.1f}"}
    for t in tool_names:
        tm = {}
        for m in metrics:
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
    for d_key, _, src in derived:
        base = med(baseline, src) if baseline else None
        res["derived"][d_key] = {
            t: (None if base is None or med(t, src) is None else med(t, src) - base)
            for t in tool_names if t != baseline}

    # ratios to direct; suspicious throughput
    for m in metrics:
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
    all_metrics = [(m.key, m.higher_better) for m in metrics if m.vs_peer] + \
                  [(d[0], False) for d in derived]
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
        if cv is not None and best is not None and (best <= 0 or cv < 0):
            r = None  # a ratio of (possibly negative) differences means nothing
        res["culvert_vs_best_peer"][key] = {"culvert": cv, "best_peer": name,
                                            "best_value": best, "ratio": r,
                                            "higher_is_better": hb}

    # every culvert variant (tool name "culvert ...") vs the best peer, per metric
    variants = [t for t in tool_names if t.startswith("culvert")]
    for key, hb in all_metrics:
        if not variants:
            break
        getv = (lambda t: res["derived"][key].get(t)) if key in res["derived"] \
            else (lambda t: med(t, key))
        if not any(key in res["tools"][t]["metrics"] for t in tool_names):
            continue
        name, best = best_of({p: getv(p) for p in peers}, hb)
        per = {}
        for v in variants:
            r = ratio(getv(v), best)
            if getv(v) is not None and best is not None and (best <= 0 or getv(v) < 0):
                r = None
            per[v] = {"value": getv(v), "ratio": r}
        res["vs_best_peer"][key] = {"best_peer": name, "best_value": best,
                                    "higher_is_better": hb, "tools": per}
    return res


class _Missing(dict):
    def __missing__(self, key):
        return "?"


def build_all(sections, meta):
    """sections: [(Section, raw, notes, tool_names, baseline, section_ctx)] -> the document.
    The forward section keeps its place at the top level (as before sections existed);
    the others go under "sections"."""
    doc = dict(meta)
    doc["sections"] = {}
    for sec, raw, notes, names, baseline, sctx in sections:
        ab_tools = {n for t in sec.ab for n in (t.a, t.b)}
        ab_keys = {k for t in sec.ab for _, keys in t.rows for k in keys}
        res = build(raw, notes, [n for n in names if n not in ab_tools], baseline, {},
                    [m for m in sec.metrics if m.key not in ab_keys], sec.derived)
        res["ab"] = [build_ab(raw, notes, t, sec.metrics) for t in sec.ab
                     if t.a in names or t.b in names]
        if sec.name == "forward":
            doc.update(res)
            continue
        fmt_ctx = {k: (f"{v:g}" if isinstance(v, float) else v) for k, v in sctx.items()}
        if "compress_bytes" in fmt_ctx:
            fmt_ctx["compress_mib"] = fmt_ctx["compress_bytes"] // 2**20
        res.update(title=sec.title, intro=sec.intro.format_map(_Missing(fmt_ctx)),
                   baseline=baseline,
                   tables=[[t, [k for k in keys]] for t, keys in sec.tables],
                   config={k: sctx[k] for k in sorted(sctx)
                           if k in ("tput_seconds", "lat_seconds", "wrk_seconds", "wrk_conns",
                                    "mem_conns", "fb_conns", "fb_gap_ms", "udp_seconds",
                                    "compress_bytes", "ab_seconds")})
        doc["sections"][sec.name] = res
    doc["targets"] = targets(doc)
    return doc


def build_ab(raw, notes, table, metrics):
    """One ABTable (sections.py) -> {title, a, b, rows: [[label, keys]], metrics, tools
    (as in build), ratio: {key: b's median / a's median, None when either is missing}}."""
    keys = [k for _, ks in table.rows for k in ks]
    res = build(raw, notes, [table.a, table.b], None, {},
                [m for m in metrics if m.key in keys], [])
    a_b = {k: [_med(res, t, k) for t in (table.a, table.b)] for k in keys}
    return {"title": table.title, "a": table.a, "b": table.b,
            "rows": [[label, ks] for label, ks in table.rows],
            "metrics": res["metrics"], "tools": res["tools"], "flags": res["flags"],
            "ratio": {k: ratio(b, a) for k, (a, b) in a_b.items()}}


# --------------------------------------------------------------------------- issue targets

def _med(sec, tool, key):
    s = (sec or {}).get("tools", {}).get(tool, {}).get("metrics", {}).get(key)
    return s["median"] if s and s.get("status") == "ok" else None


def _target(rows, what, measured, holds, why=None):
    rows.append({"target": what, "measured": measured,
                 "holds": None if holds is None else bool(holds), "why": why})


def _forward_targets(rows, fwd):
    """The TCP forwarder's targets against haproxy (splice) in the same run. Added
    latency is derived (forwarded minus direct), so it is read from `derived`."""
    H = "haproxy"

    def value(tool, key):
        if key in fwd.get("derived", {}):
            v = fwd["derived"][key].get(tool)
            return v if isinstance(v, (int, float)) else None
        return _med(fwd, tool, key)

    for key, what, unit, goal, higher, f in (
            ("tput1_gbps", "throughput 1 stream", "Gbit/s", 1.1, True, "{:.2f}"),
            ("tput8_gbps", "throughput 8 streams", "Gbit/s", 1.1, True, "{:.2f}"),
            ("added_p50_us", "added RTT p50", "µs", 1.0, False, "{:+.1f}"),
            ("added_p99_us", "added RTT p99", "µs", 1.0, False, "{:+.1f}"),
            ("conn_per_s", "connections/s", "/s", 1.2, True, "{:.0f}"),
            ("cpu_s_per_gb", "CPU-seconds per GB", "s/GB", 1.0, False, "{:.2f}")):
        c, h = value("culvert", key), value(H, key)
        r = ratio(c, h)
        goal_txt = f"≥ {goal:g}× haproxy" if higher else "≤ haproxy's"
        # Compared directly, not by ratio: an added latency may be 0 or below. Below 0
        # (forwarded faster than direct) is direct's own run-to-run noise, so it counts
        # as 0 added, not as a bar the other tool has to get under.
        noise = key.startswith("added_") and any(v is not None and v < 0 for v in (c, h))
        if c is None or h is None:
            holds = None
        elif key.startswith("added_"):
            holds = max(c, 0.0) <= goal * max(h, 0.0)
        else:
            holds = c >= goal * h if higher else c <= goal * h
        measured = f"{_fmt(c, f)} vs {_fmt(h, f)} {unit} = {_fmt(r, '{:.2f}×')}"
        if noise:
            measured += "; below 0 is within direct's noise, counted as 0"
        _target(rows, f"forward tcp: {what} {goal_txt}", measured, holds)
    n = fwd.get("config", {}).get("mem_conns")
    c = value("culvert", "kib_per_conn")
    _target(rows, "forward tcp: ≤ 2 KiB RSS per idle forwarded connection at 7,000",
            f"{_fmt(c)} KiB at {n}", None if c is None or n != 7000 else c <= 2,
            "n/a (not measured at 7,000)" if c is not None and n != 7000 else None)


def targets(doc):
    """The issue's targets, checked against this run's medians. holds None = not measured
    (FAILED, skipped or not run)."""
    rows = []
    secs = doc.get("sections", {})
    if "tools" in doc and "culvert" in doc["tools"]:
        _forward_targets(rows, doc)
    udp = secs.get("udp")
    if udp:
        loads = [k[:-5] for k in udp["metrics"] if k.endswith("_mbps")]
        loads = [p for p in loads if _measured(udp, p + "_mbps")]
        for p in loads:
            tag = udp["metrics"][p + "_mbps"]["label"].replace("delivered ", "")
            c, s = _med(udp, "culvert", p + "_mbps"), _med(udp, "socat", p + "_mbps")
            sl = _med(udp, "socat", p + "_loss")
            r = ratio(c, s)
            what = f"UDP {tag}: culvert delivers ≥ 2× socat"
            measured = f"{_fmt(c, '{:.0f}')} vs {_fmt(s, '{:.0f}')} Mbit/s = {_fmt(r, '{:.2f}×')}"
            offered = _med(udp, "culvert", p + "_sent")
            if sl is not None and sl < 1.0:
                # socat delivered (almost) all it was offered: 2x is impossible here
                _target(rows, what, measured + f"; socat lost only {sl:.2f} %", None,
                        "n/a (socat not saturated)")
            elif s is not None and offered is not None and 2 * s > offered:
                # twice what socat delivered is more than the client offered culvert
                _target(rows, what, measured + f"; offered {offered:.0f} Mbit/s", None,
                        "n/a (2× socat exceeds the offered load)")
            else:
                _target(rows, what, measured, None if r is None else r >= 2)
        ok_loads = [p for p in loads if (_med(udp, "direct", p + "_loss") is not None
                                         and _med(udp, "direct", p + "_loss") < 0.1)]
        if ok_loads:
            parts, holds = [], True
            for p in ok_loads:
                cl = _med(udp, "culvert", p + "_loss")
                tag = udp["metrics"][p + "_mbps"]["label"].replace("delivered ", "")
                parts.append(f"{tag}: direct {_med(udp, 'direct', p + '_loss'):.3f} %, "
                             f"culvert {_fmt(cl, '{:.3f}')} %")
                holds = None if cl is None or holds is None else holds and cl < 0.1
            _target(rows, "UDP: culvert loss < 0.1 % at every load where direct's is",
                    "; ".join(parts), holds)
        else:
            _target(rows, "UDP: culvert loss < 0.1 % at every load where direct's is",
                    "no load where direct had < 0.1 % loss", None)
    tun = secs.get("tunnel")
    if tun:
        S = "ssh -R"
        # Each target for the default (multiplexed) and the dedicated-channel variant,
        # when the run measured it.
        plains = [t for t in ("culvert tunnel plain", "culvert tunnel plain --mux 0")
                  if t in tun.get("tools", {})]
        tlss = [t for t in ("culvert tunnel tls", "culvert tunnel tls --mux 0")
                if t in tun.get("tools", {})]
        for P in plains:
            for key, n in (("tput1_gbps", "1 stream"), ("tput8_gbps", "8 streams")):
                c, d = _med(tun, P, key), _med(tun, "direct", key)
                r = ratio(c, d)
                _target(rows, f"{P}: throughput {n} ≥ 0.5× direct",
                        f"{_fmt(c)} vs {_fmt(d)} Gbit/s = {_fmt(r, '{:.2f}×')}",
                        None if r is None else r >= 0.5)
        for TLS in tlss:
            for key, n in (("tput1_gbps", "1 stream"), ("tput8_gbps", "8 streams")):
                c, s = _med(tun, TLS, key), _med(tun, S, key)
                r = ratio(c, s)
                _target(rows, f"{TLS}: throughput {n} ≥ 2× ssh -R",
                        f"{_fmt(c)} vs {_fmt(s)} Gbit/s = {_fmt(r, '{:.2f}×')}",
                        None if r is None else r >= 2)
        for P in plains:
            for key, n in (("fb_p50_us", "p50"), ("fb_p99_us", "p99")):
                c, h = _med(tun, P, key), _med(tun, "haproxy", key)
                r = ratio(c, h)
                _target(rows, f"{P}: first byte of a new connection (carrier or pooled "
                              f"channel), {n} ≤ 1.2× one haproxy hop",
                        f"{_fmt(c, '{:.0f}')} vs {_fmt(h, '{:.0f}')} µs = {_fmt(r, '{:.2f}×')}",
                        None if r is None else r <= 1.2)
        for t, goal in [(p, 9000) for p in plains] + [(t, 3500) for t in tlss]:
            c = _med(tun, t, "conn_per_s")
            _target(rows, f"{t}: new visitor connections/s ≥ {goal:,}",
                    f"{_fmt(c, '{:.0f}')} /s", None if c is None else c >= goal)
        n = tun.get("config", {}).get("mem_conns")
        for t in plains + tlss:
            c = _med(tun, t, "kib_per_conn")
            _target(rows, f"{t}: ≤ 4 KiB RSS (server + client) per idle connection at 5,000",
                    f"{_fmt(c)} KiB at {n}", None if c is None or n != 5000 else c <= 4,
                    "n/a (not measured at 5,000)" if c is not None and n != 5000 else None)
    ws = secs.get("ws")
    if ws:
        _ws_targets(rows, ws)
    prx = secs.get("proxy")
    if prx:
        _proxy_targets(rows, prx)
    return rows


# Issue 15: (tool, reference, metric keys, goal) for "tool ≥ goal × reference"
WS_TARGETS = [
    ("culvert tunnel wss", "culvert tunnel tls", ("tput1_gbps", "tput8_gbps"), 0.9),
    ("culvert tunnel ws --inner plain", "culvert tunnel plain", ("tput1_gbps", "tput8_gbps"),
     0.8),
    ("culvert tunnel ws", "culvert tunnel tls", ("conn_per_s",), 0.9),
    ("culvert tunnel wss", "culvert tunnel tls", ("conn_per_s",), 0.9),
]


def _ws_targets(rows, ws):
    """Issue 15's targets: the WebSocket rows against the TLS and plain tunnels measured
    in the same run. The nginx row is shown in the tables and judged by none."""
    for tool, ref, keys, goal in WS_TARGETS:
        for key in keys:
            m = ws["metrics"][key]
            c, r0 = _med(ws, tool, key), _med(ws, ref, key)
            r = ratio(c, r0)
            f = "{:.0f}" if key == "conn_per_s" else "{:.2f}"
            _target(rows, f"{tool}: {m['label']} ≥ {goal:g}× {ref}",
                    f"{_fmt(c, f)} vs {_fmt(r0, f)} {m['unit']} = {_fmt(r, '{:.2f}×')}",
                    None if r is None else r >= goal)


PROXY_PEERS = ("dante", "microsocks", "ssh -D")


def _proxy_targets(rows, prx):
    """Issue 14's targets for culvert proxy, against its own forward tcp and the peers
    measured in the same run."""
    C, F = "culvert proxy", "culvert forward tcp"
    for key, n in (("tput1_gbps", "1 stream"), ("tput8_gbps", "8 streams")):
        c, f = _med(prx, C, key), _med(prx, F, key)
        r = ratio(c, f)
        _target(rows, f"culvert proxy: throughput {n} ≥ 0.9× culvert forward tcp",
                f"{_fmt(c)} vs {_fmt(f)} Gbit/s = {_fmt(r, '{:.2f}×')}",
                None if r is None else r >= 0.9)
        peer, best = best_of({p: _med(prx, p, key) for p in PROXY_PEERS}, True)
        r = ratio(c, best)
        _target(rows, f"culvert proxy: throughput {n} ≥ 1.5× the best peer",
                f"{_fmt(c)} vs {_fmt(best)} Gbit/s ({peer or 'no peer measured'}) = "
                f"{_fmt(r, '{:.2f}×')}", None if r is None else r >= 1.5)
    c, d = _med(prx, C, "socks_conn_per_s"), _med(prx, "dante", "socks_conn_per_s")
    r = ratio(c, d)
    _target(rows, "culvert proxy: new SOCKS5 connections/s ≥ 1.5× dante",
            f"{_fmt(c, '{:.0f}')} vs {_fmt(d, '{:.0f}')} /s = {_fmt(r, '{:.2f}×')}",
            None if r is None else r >= 1.5)
    n = prx.get("config", {}).get("mem_conns")
    c = _med(prx, C, "kib_per_conn")
    _target(rows, "culvert proxy: ≤ 2 KiB RSS per idle proxied connection at 5,000",
            f"{_fmt(c)} KiB at {n}", None if c is None or n != 5000 else c <= 2,
            "n/a (not measured at 5,000)" if c is not None and n != 5000 else None)


# --------------------------------------------------------------------------- markdown

def _cell(res, tool, key):
    s = res["tools"].get(tool, {}).get("metrics", {}).get(key)
    if s is None:
        return "-"
    if s["status"] == "n/a":
        return "n/a"
    if s["status"] == "FAILED":
        return "FAILED"
    f = res["metrics"][key]["fmt"]
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


def _table(res, title, keys, extra=None, level="##"):
    tools = list(res["tools"])
    hdr = ["tool"] + [f"{res['metrics'][k]['label']} ({res['metrics'][k]['unit']})"
                      for k in keys] + [h for h, _ in (extra or [])]
    out = [f"{level} {title}", "", "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for t in tools:
        row = [t] + [_cell(res, t, k) for k in keys] + [fn(t) for _, fn in (extra or [])]
        out.append("| " + " | ".join(row) + " |")
    return out + [""]


def _ratio_table(res, level="##"):
    rk = [k for k in res["ratios_to_direct"]
          if any(k in res["tools"][t]["metrics"] for t in res["tools"])]
    if not rk:
        return []
    base = res.get("baseline") or res.get("config", {}).get("baseline")
    ref = base or "direct"  # a section's reference need not be "direct" (proxy: forward tcp)
    lines = [f"{level} Ratio to {ref} (median / {ref}'s median)", "",
             "| tool | " + " | ".join(res["metrics"][k]["label"] for k in rk) + " |",
             "|" + "---|" * (len(rk) + 1)]
    for t in res["tools"]:
        if t == base or t == "direct":
            continue
        lines.append("| " + t + " | " + " | ".join(
            _fmt(res["ratios_to_direct"][k].get(t), "{:.2f}x") for k in rk) + " |")
    return lines + [""]


def _failures(res):
    foot = []
    for t in res["tools"]:
        for k, s in res["tools"][t]["metrics"].items():
            for e in dict.fromkeys(s.get("errors", [])):
                foot.append(f"- {t} / {k}: FAILED: {e}")
        for n in dict.fromkeys(res["tools"][t]["notes"]):
            foot.append(f"- {t}: {n}")
    return foot + [f"- ⚠ {f}" for f in res["flags"]]


def _forward_body(res):
    lines = []

    def added(key):
        def fn(t):
            if t not in res["derived"].get(key, {}):
                return "—"
            return _fmt(res["derived"][key][t], "{:+.1f}")
        return fn

    lines += _table(res, "Throughput, latency, connection rate",
                    ["tput1_gbps", "tput8_gbps", "rtt_p50_us", "rtt_p99_us", "conn_per_s"],
                    [("added RTT p50 (µs)", added("added_p50_us")),
                     ("added RTT p99 (µs)", added("added_p99_us"))])
    lines += _table(res, "Resources",
                    ["cpu_s_per_gb", "rss_idle_mib", "rss_loaded_mib", "kib_per_conn",
                     "pss_kib_per_conn", "sock_mem_mib"])
    lines += _ratio_table(res)

    if res["culvert_vs_best_peer"]:
        lines += ["## culvert vs the best peer", "",
                  "| metric | better | culvert | best peer | peer value | culvert / best |",
                  "|---|---|---|---|---|---|"]
        for k, c in res["culvert_vs_best_peer"].items():
            f = res["metrics"][k]["fmt"]
            lines.append(f"| {res['metrics'][k]['label']} ({res['metrics'][k]['unit']}) | "
                         f"{'higher' if c['higher_is_better'] else 'lower'} | "
                         f"{_fmt(c['culvert'], f, 'FAILED/n/a')} | {c['best_peer'] or 'n/a'} | "
                         f"{_fmt(c['best_value'], f)} | {_fmt(c['ratio'], '{:.2f}x')} |")
        lines.append("")

    foot = _failures(res)
    if foot:
        lines += ["## Failures, flags and notes", ""] + foot + [""]
    return lines


def _measured(sec, key):
    return any(key in sec["tools"][t]["metrics"] for t in sec["tools"])


def _section_body(sec):
    lines = [f"## {sec['title']}", "", sec.get("intro", ""), ""]
    for title, keys in sec["tables"]:
        keys = [k for k in keys if _measured(sec, k)]  # e.g. loads left out of QUICK
        if keys:
            lines += _table(sec, title, keys, level="###")
    for ab in sec.get("ab", []):
        lines += _ab_table(ab)
    lines += _ratio_table(sec, level="###")
    vb = {k: v for k, v in sec.get("vs_best_peer", {}).items() if v["best_peer"]}
    if vb:
        variants = list(next(iter(vb.values()))["tools"])
        lines += ["### culvert vs the best peer (culvert's median, and / best peer's)", "",
                  "| metric | better | best peer | peer value | " + " | ".join(variants) + " |",
                  "|" + "---|" * (4 + len(variants))]
        for k, c in vb.items():
            f = sec["metrics"][k]["fmt"]
            cells = []
            for v in variants:
                st = sec["tools"][v]["metrics"].get(k, {}).get("status")
                if st in (None, "n/a", "FAILED") and c["tools"][v]["value"] is None:
                    cells.append("n/a" if st != "FAILED" else "FAILED")
                else:
                    cells.append(f"{_fmt(c['tools'][v]['value'], f)} "
                                 f"({_fmt(c['tools'][v]['ratio'], '{:.2f}x')})")
            lines.append(f"| {sec['metrics'][k]['label']} ({sec['metrics'][k]['unit']}) | "
                         f"{'higher' if c['higher_is_better'] else 'lower'} | {c['best_peer']} | "
                         f"{_fmt(c['best_value'], f)} | " + " | ".join(cells) + " |")
        lines.append("")
    foot = _failures(sec) + [f for ab in sec.get("ab", []) for f in _failures(ab)]
    if foot:
        lines += ["### Failures, flags and notes", ""] + foot + [""]
    return lines


def _ab_table(ab):
    """Rows of metrics, the two tools' cells side by side and b / a; a row label is
    shown on its first metric only."""
    a, b = ab["a"], ab["b"]
    rows = []
    for label, keys in ab["rows"]:
        for i, k in enumerate(k for k in keys if _measured(ab, k)):  # --groups may skip some
            m = ab["metrics"][k]
            rows.append(f"| {label if i == 0 else ''} | {m['label']} ({m['unit']}) | "
                        f"{'higher' if m['higher_is_better'] else 'lower'} | "
                        f"{_cell(ab, a, k)} | {_cell(ab, b, k)} | "
                        f"{_fmt(ab['ratio'][k], '{:.2f}x')} |")
    if not rows:
        return []
    return [f"### {ab['title']}", "", f"| row | metric | better | {a} | {b} | {b} / {a} |",
            "|---|---|---|---|---|---|", *rows, ""]


def _targets_table(rows):
    mark = {True: "yes", False: "**NO**", None: "n/a (not measured)"}
    lines = ["## Issue targets (this run's medians)", "", "| target | measured | holds |",
             "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['measured']} | "
                     f"{r.get('why') or mark[r['holds']]} |")
    return lines + [""]


def markdown(res):
    runs = res["config"]["runs"]
    lines = [f"# culvert benchmark ({'QUICK' if res['config']['quick'] else 'full'})", "",
             f"{res['date']} · {res['machine']['cpu_model']} · {res['machine']['nproc']} cores"
             f" · kernel {res['machine']['kernel']} · load avg at start "
             f"{res['machine']['loadavg_start']}, at end {res['machine'].get('loadavg_end', '?')}",
             ""]
    if res.get("tools"):  # the forward section (top level)
        lines += [
            f"Loopback only, one tool at a time. Each cell: median (min–max) over {runs} "
            f"run(s). iperf3 {res['config']['tput_seconds']} s per test; sockperf "
            f"ping-pong {res['config']['lat_seconds']} s (round-trip times); wrk -t1 "
            f"-c{res['config']['wrk_conns']} {res['config']['wrk_seconds']} s with "
            f"`Connection: close` against nginx; memory with {res['config']['mem_conns']} "
            f"idle forwarded connections. Numbers are only comparable within this run.", ""]
        lines += _forward_body(res)
    else:
        lines += [f"Loopback only, one tool at a time. Each cell: median (min–max) over "
                  f"{runs} run(s). Numbers are only comparable within this run.", ""]
    for sec in res.get("sections", {}).values():
        lines += _section_body(sec)
    if res.get("targets"):
        lines += _targets_table(res["targets"])
    lines += [f"Total harness time: {res.get('elapsed_s', 0):.0f} s.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- chart

def chart(res, png_path, workdir, timeout=60):
    """Bar chart (median, min–max error bars) of the chart metrics with gnuplot.
    Returns None on success or a reason string."""
    gp = shutil.which("gnuplot")
    if not gp:
        return "gnuplot not installed"
    if not res.get("tools"):
        return "the chart shows the forward section, which did not run"
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
