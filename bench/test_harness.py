"""Self-test of the benchmark harness: parsers, /proc readers, failure paths, ratios and
the report. Runs in seconds, starts no real benchmark (only tiny sh/python processes).

    python3 -m pytest -q bench/test_harness.py
"""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import tools  # noqa: E402
from benchlib import Failed, StartError  # noqa: E402
from measures import NA, Group  # noqa: E402

# --------------------------------------------------------------------------- samples

IPERF_OK = json.dumps({
    "start": {"connected": [{"socket": 5}]},
    "end": {"sum_sent": {"bytes": 2568355840, "bits_per_second": 20.5e9},
            "sum_received": {"start": 0, "end": 1.0006, "seconds": 1.0006,
                             "bytes": 2568355840, "bits_per_second": 20533971919.6,
                             "sender": True}}})
IPERF_ERR = ('{\n\t"start":\t{\n\t\t"connected":\t[]\n\t},\n\t"intervals":\t[],\n\t"end":\t{\n\t},'
             '\n\t"error":\t"unable to connect to server: Connection refused"\n}\n')

SOCKPERF_OUT = """\
sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=57033; ReceivedMessages=57032
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=45389; ReceivedMessages=45389
sockperf: \x1b[2;35m====> avg-rtt=34.122 (std-dev=40.464)\x1b[0m
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Round trip is 34.122 usec
sockperf: \x1b[2;35mTotal 45389 observations\x1b[0m; each percentile contains 453.89 observations
sockperf: ---> <MAX> observation = 2745.630
sockperf: ---> percentile 99.999 = 2745.630
sockperf: ---> percentile 99.990 = 2090.140
sockperf: ---> percentile 99.900 =  161.128
sockperf: ---> percentile 99.000 =   92.776
sockperf: ---> percentile 90.000 =   64.374
sockperf: ---> percentile 75.000 =   53.518
sockperf: ---> percentile 50.000 =   14.620
sockperf: ---> percentile 25.000 =   13.670
sockperf: ---> <MIN> observation =   13.428
"""

WRK_OK = """\
Running 5s test @ http://127.0.0.1:40000/small.html
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.12ms    2.69ms  59.35ms   85.50%
    Req/Sec    11.97k     1.77k   13.22k    70.00%
  59655 requests in 5.01s, 47.60MB read
Requests/sec:  11907.38
Transfer/sec:      9.50MB
"""
WRK_ERRORS = """\
Running 5s test @ http://127.0.0.1:40000/small.html
  1 threads and 50 connections
  59655 requests in 5.01s, 47.60MB read
  Socket errors: connect 0, read 12, write 3, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  11907.38
Transfer/sec:      9.50MB
"""
WRK_NONE = """\
Running 5s test @ http://127.0.0.1:40000/small.html
  1 threads and 50 connections
  0 requests in 5.01s, 0.00B read
  Socket errors: connect 50, read 0, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:       0.00B
"""

PROC_STAT = ("4242 (we ird) (name) S 1 4242 4242 0 -1 4194560 500 0 0 0 "
             "150 25 7 3 20 0 3 0 123456 10000000 2000 18446744073709551615 "
             "1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0")
PROC_STATUS = "Name:\tculvert\nState:\tS (sleeping)\nVmPeak:\t  30000 kB\nVmRSS:\t   11776 kB\n"
SOCKSTAT = ("sockets: used 49\nTCP: inuse 25 orphan 0 tw 7584 alloc 27 mem 17\n"
            "UDP: inuse 0 mem 0\n")
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4A39 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:9C40 0100007F:4A39 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1
"""


# --------------------------------------------------------------------------- parsers

def test_iperf3_ok():
    r = benchlib.parse_iperf3_json(IPERF_OK)
    assert r["bps"] == pytest.approx(20533971919.6)
    assert r["bytes"] == 2568355840


@pytest.mark.parametrize("text", [IPERF_ERR, "", "iperf3: error", '{"end": {}}',
                                  '{"end": {"sum_received": {"bits_per_second": 0, "bytes": 0}}}'])
def test_iperf3_bad(text):
    with pytest.raises(ValueError):
        benchlib.parse_iperf3_json(text)


def test_sockperf():
    r = benchlib.parse_sockperf(SOCKPERF_OUT)
    assert r == {"p50": 14.62, "p99": 92.776, "avg": 34.122}


def test_sockperf_bad():
    with pytest.raises(ValueError):
        benchlib.parse_sockperf("sockperf: ERROR: connect failed\n")


def test_wrk():
    assert benchlib.parse_wrk(WRK_OK) == {"rps": 11907.38, "requests": 59655, "errors": 0}
    assert benchlib.parse_wrk(WRK_ERRORS)["errors"] == 12 + 3 + 1 + 4
    for bad in (WRK_NONE, "unable to connect to 127.0.0.1:1 Connection refused\n"):
        with pytest.raises(ValueError):
            benchlib.parse_wrk(bad)


def test_proc_parsers():
    s = benchlib.parse_proc_stat(PROC_STAT)
    assert (s["state"], s["ppid"], s["utime"], s["stime"], s["cutime"], s["cstime"]) == \
        ("S", 1, 150, 25, 7, 3)
    assert s["session"] == 4242 and s["starttime"] == 123456
    assert benchlib.parse_status_kib(PROC_STATUS) == 11776
    assert benchlib.parse_status_kib("Name:\tzombie\n") is None
    assert benchlib.parse_sockstat_tcp_mem(SOCKSTAT) == 17
    assert benchlib.parse_listening_ports(PROC_NET_TCP) == {0x4A39, 2024}
    assert benchlib.parse_ss_backlog("LISTEN 0      10         127.0.0.1:21003      0.0.0.0:*\n") == 10
    assert benchlib.parse_ss_backlog("") is None
    assert benchlib.parse_ready_line("listening tcp 127.0.0.1:40321 -> 127.0.0.1:8080") == 40321
    with pytest.raises(ValueError):
        benchlib.parse_ready_line("info something else")


def test_proc_readers_on_self():
    rss, n = benchlib.rss_kib([os.getpid()], include_children=False)
    assert rss > 1000 and n == 1
    assert isinstance(benchlib.sockstat_tcp_mem_kib(), int)


# --------------------------------------------------------------------------- stats, ratios

def test_summarize():
    s = benchlib.summarize([3.0, 1.0, 2.0])
    assert (s["status"], s["median"], s["min"], s["max"]) == ("ok", 2.0, 1.0, 3.0)
    s = benchlib.summarize([Failed("x"), 4.0])
    assert s["status"] == "ok" and s["median"] == 4.0 and s["n_failed"] == 1
    s = benchlib.summarize([Failed("a"), Failed("b")])
    assert s["status"] == "FAILED" and s["median"] is None and s["errors"] == ["a", "b"]


def test_ratio():
    assert benchlib.ratio(5.0, 10.0) == 0.5
    assert benchlib.ratio(5.0, None) is None
    assert benchlib.ratio(None, 10.0) is None
    assert benchlib.ratio(5.0, Failed("x")) is None
    assert benchlib.ratio(5.0, 0) is None
    assert benchlib.best_of({"a": 1.0, "b": 3.0, "c": None}, True) == ("b", 3.0)
    assert benchlib.best_of({"a": 1.0, "b": 3.0}, False) == ("a", 1.0)
    assert benchlib.best_of({"a": None}, True) == (None, None)


META = {"date": "2026-01-01T00:00:00+00:00",
        "machine": {"nproc": 2, "kernel": "6.x", "cpu_model": "test", "loadavg_start": "0.1"},
        "config": {"quick": True, "runs": 2, "tput_seconds": 3, "lat_seconds": 3,
                   "wrk_seconds": 3, "wrk_conns": 50, "mem_conns": 10, "baseline": "direct"}}


def test_report_missing_direct_and_failed_tool():
    raw = {"direct": {"tput1_gbps": [Failed("iperf3 timed out")] * 2,
                      "rtt_p50_us": [10.0, 12.0]},
           "culvert": {"tput1_gbps": [Failed("culvert did not start: exited")] * 2,
                       "rtt_p50_us": [20.0, 22.0], "cpu_s_per_gb": [Failed("x")] * 2},
           "socat": {"tput1_gbps": [5.0, 7.0], "rtt_p50_us": [30.0, 40.0],
                     "cpu_s_per_gb": [1.0, 2.0], "rss_idle_mib": [NA, NA]}}
    res = report.build(raw, {}, ["direct", "culvert", "socat"], "direct", META)
    # direct failed -> no ratio, never a ratio to 0 or a made-up baseline
    assert res["ratios_to_direct"]["tput1_gbps"] == {"culvert": None, "socat": None}
    assert res["ratios_to_direct"]["rtt_p50_us"]["culvert"] == pytest.approx(21 / 11)
    assert res["derived"]["added_p50_us"]["socat"] == pytest.approx(35 - 11)
    c = res["tools"]["culvert"]["metrics"]["tput1_gbps"]
    assert c["status"] == "FAILED" and c["median"] is None
    assert res["tools"]["socat"]["metrics"]["rss_idle_mib"]["status"] == "n/a"
    assert res["culvert_vs_best_peer"]["tput1_gbps"]["ratio"] is None
    assert res["culvert_vs_best_peer"]["tput1_gbps"]["best_peer"] == "socat"
    md = report.markdown(res)
    row = next(line for line in md.splitlines() if line.startswith("| culvert |"))
    assert "FAILED" in row and "| 0" not in row
    assert "culvert did not start" in md
    json.dumps(res)  # serialisable


def test_report_without_direct_tool():
    raw = {"culvert": {"tput1_gbps": [5.0, 6.0]}}
    res = report.build(raw, {}, ["culvert"], None, META)
    assert res["ratios_to_direct"]["tput1_gbps"] == {"culvert": None}
    report.markdown(res)


@pytest.mark.skipif(not shutil.which("gnuplot"), reason="gnuplot not installed")
def test_chart_with_failed_values(tmp_path):
    raw = {"direct": {"tput1_gbps": [10.0, 11.0], "pss_kib_per_conn": [NA, NA]},
           "culvert": {"tput1_gbps": [Failed("y")] * 2, "pss_kib_per_conn": [1.0, 2.0]}}
    res = report.build(raw, {}, ["direct", "culvert"], "direct", META)
    png = tmp_path / "c.png"
    assert report.chart(res, str(png), str(tmp_path)) is None
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_suspicious_throughput_flag():
    raw = {"direct": {"tput1_gbps": [10.0, 10.0]}, "culvert": {"tput1_gbps": [11.0, 11.0]},
           "redir": {"tput1_gbps": [10.4, 10.4]}}
    res = report.build(raw, {}, ["direct", "culvert", "redir"], "direct", META)
    assert res["tools"]["culvert"]["metrics"]["tput1_gbps"].get("suspicious")
    assert not res["tools"]["redir"]["metrics"]["tput1_gbps"].get("suspicious")
    assert any("suspicious" in f for f in res["flags"])
    assert "⚠suspicious" in report.markdown(res)


# --------------------------------------------------------------------------- failure paths

@pytest.fixture
def ctx(tmp_path):
    return SimpleNamespace(tmp=str(tmp_path), culvert=str(tmp_path / "culvert"),
                           start_timeout=3.0)


def test_forwarder_that_exits_at_once(ctx):
    with pytest.raises(StartError, match="exited with status 3"):
        tools._start_listening(ctx, "bogus", ["sh", "-c", "echo boom >&2; exit 3"],
                               benchlib.free_port())


def test_culvert_that_exits_at_once(ctx, tmp_path):
    fake = tmp_path / "culvert"
    fake.write_text("#!/bin/sh\necho 'error: cannot listen' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(StartError, match="exited with status 1 without a ready line"):
        tools.start_culvert(ctx, 9)


def test_culvert_missing_binary(ctx):
    with pytest.raises(StartError, match="not found"):
        tools.start_culvert(ctx, 9)


def test_forwarder_that_never_listens(ctx):
    ctx.start_timeout = 0.5
    with pytest.raises(StartError, match="not listening"):
        tools._start_listening(ctx, "sleepy", ["sleep", "30"], benchlib.free_port())
    assert not benchlib._LIVE  # the sleeper was killed


class FakeBackend:
    name = "fake"

    def __init__(self, ctx):
        self.port = benchlib.free_port()

    def start(self):
        return self

    def stop(self):
        pass


def test_failed_row_end_to_end(ctx, tmp_path):
    """A forwarder whose command exits at once -> FAILED cells in JSON and Markdown,
    while the baseline still gets its number and the run goes on."""
    def start_broken(c, target_port):
        return tools.Forwarder("broken", 1, [tools._start_listening(
            c, "broken", ["sh", "-c", "exit 7"], benchlib.free_port())])

    calls = []

    def run_fn(c, fwd, be):
        calls.append(fwd.name)
        return {"tput1_gbps": 42.0}

    g = Group("throughput", FakeBackend, run_fn, ["tput1_gbps"], lambda c: 0)
    tl = [tools.Tool("direct", tools.start_direct, baseline=True),
          tools.Tool("broken", start_broken)]
    raw, notes = run.run_all(ctx, tl, [g], 2, time.monotonic() + 60)
    assert raw["direct"]["tput1_gbps"] == [42.0, 42.0]
    assert all(isinstance(v, Failed) and "did not start" in v.reason
               for v in raw["broken"]["tput1_gbps"])
    assert calls == ["direct", "direct"]
    res = report.build(raw, notes, ["direct", "broken"], "direct", META)
    assert res["tools"]["broken"]["metrics"]["tput1_gbps"]["status"] == "FAILED"
    assert res["tools"]["broken"]["metrics"]["tput1_gbps"]["values"][0]["failed"]
    assert res["ratios_to_direct"]["tput1_gbps"]["broken"] is None
    row = next(line for line in report.markdown(res).splitlines()
               if line.startswith("| broken |"))
    assert "FAILED" in row and "42" not in row


def test_measurement_exception_and_budget(ctx):
    def boom(c, fwd, be):
        raise RuntimeError("parser exploded")

    g = Group("latency", FakeBackend, boom, ["rtt_p50_us"], lambda c: 0)
    tl = [tools.Tool("direct", tools.start_direct, baseline=True)]
    raw, _ = run.run_all(ctx, tl, [g], 1, time.monotonic() + 60)
    assert "parser exploded" in raw["direct"]["rtt_p50_us"][0].reason
    g2 = Group("latency", FakeBackend, boom, ["rtt_p50_us"], lambda c: 100)
    raw, _ = run.run_all(ctx, tl, [g2], 1, time.monotonic() + 1)
    assert "time budget" in raw["direct"]["rtt_p50_us"][0].reason


def test_na_group_for_tool(ctx):
    g = Group("memory", FakeBackend, lambda c, f, b: {"kib_per_conn": 1.0},
              ["kib_per_conn"], lambda c: 0)
    tl = [tools.Tool("direct", tools.start_direct, na={"memory"}, baseline=True)]
    raw, _ = run.run_all(ctx, tl, [g], 2, time.monotonic() + 60)
    assert raw["direct"]["kib_per_conn"] == [NA, NA]


# --------------------------------------------------------------------------- processes

def test_kill_proc_kills_forked_children(tmp_path):
    p = benchlib.spawn(["sh", "-c", "sleep 60 & sleep 60 & wait"], str(tmp_path / "l"))
    time.sleep(0.3)
    kids = benchlib.tree_pids([p.pid])
    assert len(kids) >= 3
    benchlib.kill_proc(p, grace=2)
    time.sleep(0.2)
    assert not any(benchlib._alive(k) for k in kids)


def test_cpu_meter_counts_exited_children(tmp_path):
    # a child that burns ~0.3 s of CPU and exits; parent never waits for it
    # (SIGCHLD ignored, as in redir), so its time never reaches cutime
    code = ("import os,signal,time\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
            "if os.fork()==0:\n  t=time.process_time()\n"
            "  while time.process_time()-t<0.3: pass\n  os._exit(0)\ntime.sleep(3)\n")
    p = benchlib.spawn([sys.executable, "-c", code], str(tmp_path / "l"))
    try:
        m = benchlib.CpuMeter([p.pid], interval=0.05).start()
        time.sleep(1.0)
        used = m.stop()
    finally:
        benchlib.kill_proc(p)
    assert 0.2 < used < 1.0


def test_run_cmd_timeout():
    t = time.monotonic()
    rc, _, _ = benchlib.run_cmd(["sleep", "30"], timeout=0.3)
    assert rc is None and time.monotonic() - t < 5


def test_memload_roundtrip(tmp_path):
    """The memory helper: sink + client over loopback with a handful of connections."""
    here = os.path.dirname(os.path.abspath(__file__))
    port, status = benchlib.free_port(), str(tmp_path / "count")
    sink = benchlib.spawn([sys.executable, os.path.join(here, "memload.py"), "sink",
                           "--port", str(port), "--status", status], str(tmp_path / "s"))
    try:
        benchlib.wait_listening(port, [sink], 10)
        c = subprocess.run([sys.executable, os.path.join(here, "memload.py"), "client",
                            "--port", str(port), "--n", "20", "--batch", "7",
                            "--sink-status", status, "--timeout", "10"],
                           input="close\n", capture_output=True, text=True, timeout=30)
        assert c.stdout.splitlines()[0] == "connected 20"
    finally:
        benchlib.kill_proc(sink)


# --------------------------------------------------------------------------- new sections

import measures  # noqa: E402
import probe  # noqa: E402
import sections  # noqa: E402

IPERF_UDP_OK = json.dumps({"end": {
    "sum": {"bits_per_second": 999928000.6, "lost_packets": 62949, "packets": 267840,
            "lost_percent": 23.5, "sender": True},
    "sum_sent": {"bytes": 374976000, "bits_per_second": 999928000.6, "lost_packets": 0,
                 "packets": 267840, "lost_percent": 0, "sender": True},
    "sum_received": {"bytes": 286823600, "bits_per_second": 764452422.4,
                     "lost_packets": 62949, "packets": 267823,
                     "lost_percent": 23.502464157706093, "sender": False}}})
# iperf3 < 3.10: only end.sum, the receiver's figures as the client reports them
IPERF_UDP_OLD = json.dumps({"end": {"sum": {"bits_per_second": 2e8, "lost_packets": 3,
                                            "packets": 1000, "lost_percent": 0.3}}})
CLOSED_COMPRESS = ('info connection closed listen=127.0.0.1:37969 peer=127.0.0.1:54016 '
                   'up=120 down=268435456 duration=2.5s reason=eof wire_up=77 '
                   'wire_down=74000000\n')
CLOSED_RESET = ('info connection closed listen=127.0.0.1:37969 peer=127.0.0.1:54016 '
                'up=4157603877 down=0 duration=3.008s reason=reset '
                'error="splice: Connection reset by peer (ECONNRESET)"\n')
PROC_NET_UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 9624: 0100007F:4A3A 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5070395 2 00000000847e930e 0
"""


def test_iperf3_udp():
    r = benchlib.parse_iperf3_udp_json(IPERF_UDP_OK)
    assert r["bps"] == pytest.approx(764452422.4) and r["sent_bps"] == pytest.approx(999928000.6)
    assert r["loss_pct"] == pytest.approx(23.5025, abs=1e-3) and r["lost"] == 62949
    old = benchlib.parse_iperf3_udp_json(IPERF_UDP_OLD)
    assert old["bps"] == 2e8 and old["loss_pct"] == 0.3


@pytest.mark.parametrize("text", [IPERF_ERR, "", IPERF_OK, '{"end": {}}', json.dumps(
    {"end": {"sum_received": {"bits_per_second": 0, "lost_packets": 10, "packets": 10,
                              "lost_percent": 100}, "sum_sent": {"bits_per_second": 1e6}}})])
def test_iperf3_udp_bad(text):
    with pytest.raises(ValueError):
        benchlib.parse_iperf3_udp_json(text)


def test_culvert_lines():
    assert benchlib.parse_ready_line("listening udp 127.0.0.1:5302 -> 127.0.0.1:5301",
                                     "udp") == 5302
    with pytest.raises(ValueError):
        benchlib.parse_ready_line("listening udp 127.0.0.1:5302 -> 127.0.0.1:5301")
    assert benchlib.parse_tunnel_ready("listening tunnel 127.0.0.1:45565") == 45565
    with pytest.raises(ValueError):
        benchlib.parse_tunnel_ready("listening tcp 127.0.0.1:1 -> x")
    assert benchlib.parse_exposed("exposed tcp 127.0.0.1:37969 -> 127.0.0.1:5301") == \
        ("tcp", 37969)
    assert benchlib.parse_exposed("exposed udp 127.0.0.1:5310 -> 127.0.0.1:5301") == \
        ("udp", 5310)
    with pytest.raises(ValueError):
        benchlib.parse_exposed("warning transport is plain")
    d = benchlib.parse_closed_line(CLOSED_COMPRESS)
    assert d["wire_down"] == 74000000 and d["down"] == 268435456 and d["listen"] == \
        "127.0.0.1:37969"
    d = benchlib.parse_closed_line(CLOSED_RESET)
    assert d["error"] == "splice: Connection reset by peer (ECONNRESET)" and "wire_down" not in d
    assert benchlib.parse_closed_line("info client connected peer=127.0.0.1:1") is None
    assert benchlib.parse_udp_ports(PROC_NET_UDP) == {0x4A3A}


def test_probe_json():
    assert benchlib.parse_probe_json('noise\n{"ok": 5, "n": 5}\n', ("ok",))["ok"] == 5
    with pytest.raises(ValueError, match="boom"):
        benchlib.parse_probe_json('{"bytes": 0, "error": "boom"}', ("seconds",))
    with pytest.raises(ValueError):
        benchlib.parse_probe_json("Traceback ...", ("ok",))


def test_probe_percentile_and_blocks():
    assert probe.pct(list(range(1, 101)), 99) == 99
    assert probe.pct(list(range(1, 101)), 50) == 50
    assert probe.pct([7.0], 99) == 7.0
    import zlib
    t1, t2 = probe.make_block("text", 1 << 16), probe.make_block("text", 1 << 16)
    assert t1 == t2 and len(t1) == 1 << 16  # deterministic
    assert len(zlib.compress(t1, 1)) < 0.4 * len(t1)
    r = probe.make_block("random", 1 << 16)
    assert len(zlib.compress(r, 1)) > 0.99 * len(r)


def test_server_closed_line(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("info client connected peer=x\n" + CLOSED_RESET.replace("37969", "1")
                   + CLOSED_COMPRESS)
    assert measures.server_closed_line(str(log), 37969, timeout=0)["wire_down"] == 74000000
    assert measures.server_closed_line(str(log), 2, timeout=0) is None


def test_probe_roundtrip(tmp_path):
    """byte-server + firstbyte, source + fetch, over loopback, tiny sizes."""
    here = os.path.dirname(os.path.abspath(__file__))
    p1, p2 = benchlib.free_port(), benchlib.free_port()
    bs = benchlib.spawn([sys.executable, os.path.join(here, "probe.py"), "byte-server",
                         "--port", str(p1)], str(tmp_path / "b"))
    src = benchlib.spawn([sys.executable, os.path.join(here, "probe.py"), "source", "--kind",
                          "text", "--bytes", str(5 * 2**20 + 3), "--port", str(p2)],
                         str(tmp_path / "s"))
    try:
        benchlib.wait_listening(p1, [bs], 10)
        benchlib.wait_listening(p2, [src], 10)
        rc, out, _ = benchlib.run_cmd([sys.executable, os.path.join(here, "probe.py"),
                                       "firstbyte", "--port", str(p1), "--n", "20"], 30)
        r = benchlib.parse_probe_json(out, ("ok",))
        assert rc == 0 and r["ok"] == 20 and 0 < r["p50_us"] <= r["p99_us"]
        rc, out, _ = benchlib.run_cmd([sys.executable, os.path.join(here, "probe.py"),
                                       "fetch", "--port", str(p2)], 30)
        assert benchlib.parse_probe_json(out, ("bytes", "seconds"))["bytes"] == 5 * 2**20 + 3
        # nobody listening: every connection fails, reported, not a number
        rc, out, _ = benchlib.run_cmd([sys.executable, os.path.join(here, "probe.py"),
                                       "firstbyte", "--port", "1", "--n", "3"], 30)
        r = benchlib.parse_probe_json(out, ("ok",))
        assert r["ok"] == 0 and "p50_us" not in r and r["errors"]
    finally:
        benchlib.kill_proc(bs)
        benchlib.kill_proc(src)


def test_tunnel_with_failing_server(ctx, tmp_path):
    fake = tmp_path / "culvert"
    fake.write_text("#!/bin/sh\n[ \"$1\" = token ] && { echo tok; exit 0; }\n"
                    "echo 'error: address in use' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(StartError, match="exited with status 1"):
        tools.start_tunnel_plain(ctx, 9)
    assert not benchlib._LIVE


def test_tunnel_client_that_never_exposes(ctx, tmp_path):
    """Server comes up, the client never prints `exposed` -> StartError, both killed."""
    ctx.start_timeout = 1.0
    fake = tmp_path / "culvert"
    fake.write_text("#!/bin/sh\ncase \"$1\" in\n token) echo tok ;;\n"
                    " server) echo 'listening tunnel 127.0.0.1:40000'; exec sleep 30 ;;\n"
                    " client) exec sleep 30 ;;\nesac\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(StartError, match="no ready line"):
        tools.start_tunnel_tls(ctx, 9)
    assert not benchlib._LIVE


def _sec(name, raw, tools_, ctx_=None):
    s = sections.SECTION_BY_NAME[name]
    base = next((t.name for t in s.tools if t.baseline), None)
    return (s, raw, {}, tools_, base, ctx_ or {"mem_conns": 5000, "udp_seconds": 3,
                                               "compress_bytes": 2**28, "fb_conns": 500,
                                               "fb_gap_ms": 2.0, "tput_seconds": 5,
                                               "lat_seconds": 3, "wrk_seconds": 3,
                                               "wrk_conns": 50, "ab_seconds": 2})


def test_sections_report_and_targets():
    udp_raw = {
        "direct": {"udp_200m_1400_mbps": [200.0, 200.0], "udp_200m_1400_loss": [0.0, 0.01],
                   "udp_3g_8000_mbps": [2400.0, 2300.0], "udp_3g_8000_loss": [20.0, 21.0]},
        "culvert": {"udp_200m_1400_mbps": [200.0, 199.0], "udp_200m_1400_loss": [0.2, 0.3],
                    "udp_3g_8000_mbps": [1500.0, 1400.0], "udp_3g_8000_loss": [50.0, 52.0],
                    "udp_1g_1400_sent": [1000.0, 1000.0], "udp_1g_1400_mbps": [980.0, 990.0],
                    "udp_1g_1400_loss": [2.0, 1.0]},
        "socat": {"udp_200m_1400_mbps": [190.0, 192.0], "udp_200m_1400_loss": [0.0, 0.0],
                  "udp_1g_1400_mbps": [900.0, 880.0], "udp_1g_1400_loss": [10.0, 12.0],
                  "udp_3g_8000_mbps": [Failed("socat died")] * 2,
                  "udp_3g_8000_loss": [Failed("socat died")] * 2}}
    P, TLS = "culvert tunnel plain", "culvert tunnel tls"
    tun_raw = {
        "direct": {"tput1_gbps": [20.0, 20.0], "fb_p50_us": [100.0, 100.0],
                   "kib_per_conn": [NA, NA]},
        P: {"tput1_gbps": [12.0, 11.0], "fb_p50_us": [300.0, 320.0], "conn_per_s": [9500.0, 9100.0],
            "kib_per_conn": [1.2, 1.3]},
        TLS: {"tput1_gbps": [5.0, 5.0], "conn_per_s": [Failed("wrk rc=1")] * 2,
              "kib_per_conn": [30.0, 31.0]},
        "ssh -R": {"tput1_gbps": [2.0, 2.0], "kib_per_conn": [3.0, 3.0]},
        "haproxy": {"fb_p50_us": [250.0, 270.0]}}
    doc = report.build_all([
        _sec("udp", udp_raw, ["direct", "culvert", "socat"]),
        _sec("tunnel", tun_raw, ["direct", P, TLS, "ssh -R", "haproxy"])],
        {**META, "elapsed_s": 1})
    u = doc["sections"]["udp"]
    assert u["ratios_to_direct"]["udp_3g_8000_mbps"]["culvert"] == pytest.approx(1450 / 2350)
    assert u["ratios_to_direct"]["udp_3g_8000_mbps"]["socat"] is None
    t = {r["target"]: r for r in doc["targets"]}
    # socat not saturated at 200M: 2x is impossible there -> not judged
    r200 = t["UDP 200M -l 1400: culvert delivers ≥ 2× socat"]
    assert r200["holds"] is None and "not saturated" in r200["why"]
    assert t["UDP 3G -l 8000: culvert delivers ≥ 2× socat"]["holds"] is None  # socat FAILED
    # socat lost 11 % of 1000 Mbit/s: 2x its 890 would be more than was offered
    r1g = t["UDP 1G -l 1400: culvert delivers ≥ 2× socat"]
    assert r1g["holds"] is None and "exceeds the offered load" in r1g["why"]
    assert t["UDP: culvert loss < 0.1 % at every load where direct's is"]["holds"] is False
    assert t[f"{P}: throughput 1 stream ≥ 0.5× direct"]["holds"] is True
    assert t[f"{P}: throughput 8 streams ≥ 0.5× direct"]["holds"] is None
    assert t[f"{TLS}: throughput 1 stream ≥ 2× ssh -R"]["holds"] is True
    # variants the run did not measure get no rows
    assert not any("--mux 0" in k for k in t)
    fb = t[f"{P}: first byte of a new connection (carrier or pooled channel), p50 ≤ 1.2× "
           "one haproxy hop"]
    assert fb["holds"] is True and "1.19×" in fb["measured"]
    assert t[f"{P}: new visitor connections/s ≥ 9,000"]["holds"] is True
    assert t[f"{TLS}: new visitor connections/s ≥ 3,500"]["holds"] is None
    assert t[f"{TLS}: ≤ 4 KiB RSS (server + client) per idle connection at 5,000"]["holds"] \
        is False
    vb = doc["sections"]["tunnel"]["vs_best_peer"]["tput1_gbps"]
    assert vb["best_peer"] == "ssh -R" and vb["tools"][TLS]["ratio"] == pytest.approx(2.5)
    assert doc["sections"]["tunnel"]["vs_best_peer"]["fb_p50_us"]["best_peer"] == "haproxy"
    md = report.markdown(doc)
    assert "## UDP forwarders" in md and "## Issue targets" in md and "**NO**" in md
    row = next(x for x in md.splitlines() if x.startswith("| socat |") and "FAILED" in x)
    assert "| 0 " not in row
    assert "socat / udp_3g_8000_mbps: FAILED: socat died" in md
    json.dumps(doc)
    # memory not measured at 5,000 -> not judged
    doc = report.build_all([_sec("tunnel", tun_raw, ["direct", P, TLS, "ssh -R", "haproxy"],
                                 {"mem_conns": 2000})], {**META})
    t = {r["target"]: r for r in doc["targets"]}
    assert t[f"{P}: ≤ 4 KiB RSS (server + client) per idle connection at 5,000"]["holds"] is None


def test_select_sections():
    ap = run.argparse.ArgumentParser()
    a = SimpleNamespace(only="udp,tunnel", tools=None, groups=None)
    got = run.select(a, ap)
    assert [s.name for s, _, _ in got] == ["udp", "tunnel"]
    a = SimpleNamespace(only="tunnel", tools="culvert tunnel plain,haproxy", groups="firstbyte")
    (sec, tl, gl), = run.select(a, ap)
    assert [t.name for t in tl] == ["culvert tunnel plain", "haproxy"]
    assert [g.name for g in gl] == ["firstbyte"]
    for bad in (SimpleNamespace(only="nope", tools=None, groups=None),
                SimpleNamespace(only=None, tools="nope", groups=None)):
        with pytest.raises(SystemExit):
            run.select(bad, ap)
    c = run.section_ctx(SimpleNamespace(mem_conns=7000, udp_seconds=9),
                        sections.SECTION_BY_NAME["tunnel"], quick=False)
    assert c.mem_conns == 5000 and c.udp_seconds == 9


def test_forward_targets_are_judged_against_haproxy():
    raw = {
        "direct": {"tput1_gbps": [20.0, 20.0], "rtt_p50_us": [80.0, 80.0],
                   "rtt_p99_us": [300.0, 300.0], "conn_per_s": [20000.0, 20000.0],
                   "kib_per_conn": [NA, NA], "cpu_s_per_gb": [NA, NA]},
        "culvert": {"tput1_gbps": [18.0, 17.0], "rtt_p50_us": [120.0, 120.0],
                    "rtt_p99_us": [900.0, 900.0], "conn_per_s": [12000.0, 12000.0],
                    "kib_per_conn": [0.6, 0.6], "cpu_s_per_gb": [0.2, 0.2],
                    "tput8_gbps": [Failed("culvert died")] * 2},
        "haproxy": {"tput1_gbps": [15.0, 15.0], "rtt_p50_us": [130.0, 130.0],
                    "rtt_p99_us": [500.0, 500.0], "conn_per_s": [12500.0, 12500.0],
                    "kib_per_conn": [3.3, 3.3], "cpu_s_per_gb": [0.3, 0.3],
                    "tput8_gbps": [16.0, 16.0]}}
    doc = report.build_all([_sec("forward", raw, ["direct", "culvert", "haproxy"])],
                           {**META, "config": {**META["config"], "mem_conns": 7000}})
    t = {r["target"]: r for r in doc["targets"]}
    tp = t["forward tcp: throughput 1 stream ≥ 1.1× haproxy"]
    assert tp["holds"] is True and "1.17×" in tp["measured"]
    assert t["forward tcp: throughput 8 streams ≥ 1.1× haproxy"]["holds"] is None  # FAILED
    assert t["forward tcp: added RTT p50 ≤ haproxy's"]["holds"] is True      # +40 vs +50
    assert t["forward tcp: added RTT p99 ≤ haproxy's"]["holds"] is False     # +600 vs +200
    assert t["forward tcp: connections/s ≥ 1.2× haproxy"]["holds"] is False
    assert t["forward tcp: CPU-seconds per GB ≤ haproxy's"]["holds"] is True
    assert t["forward tcp: ≤ 2 KiB RSS per idle forwarded connection at 7,000"]["holds"] is True
    assert "forward tcp: connections/s" in report.markdown(doc)


def test_added_latency_below_direct_counts_as_none_added():
    """Forwarded p99 under direct's p99 is noise: -31 vs -57 µs holds (0 ≤ 0), and a
    positive added latency against a negative one does not (+5 > 0)."""
    def doc_for(culvert_p99, haproxy_p99):
        raw = {
            "direct": {"rtt_p50_us": [80.0, 80.0], "rtt_p99_us": [300.0, 300.0]},
            "culvert": {"rtt_p50_us": [100.0, 100.0], "rtt_p99_us": [culvert_p99] * 2},
            "haproxy": {"rtt_p50_us": [110.0, 110.0], "rtt_p99_us": [haproxy_p99] * 2}}
        doc = report.build_all([_sec("forward", raw, ["direct", "culvert", "haproxy"])], META)
        return {r["target"]: r for r in doc["targets"]}["forward tcp: added RTT p99 ≤ haproxy's"]

    both_below = doc_for(269.0, 243.0)
    assert both_below["holds"] is True
    assert "within direct's noise" in both_below["measured"]
    assert doc_for(305.0, 243.0)["holds"] is False
    assert doc_for(305.0, 310.0)["holds"] is True
    assert "noise" not in doc_for(305.0, 310.0)["measured"]


# --------------------------------------------------------------------------- several loops

def test_run_cmds_runs_at_once_keeps_order_and_times_out():
    t = time.monotonic()
    done = benchlib.run_cmds([["sh", "-c", "sleep 0.6; echo one"],
                              ["sh", "-c", "sleep 0.6; echo two >&2; exit 3"]], timeout=10)
    assert time.monotonic() - t < 1.1  # together, not one after the other
    assert done == [(0, "one\n", ""), (3, "", "two\n")]
    t = time.monotonic()
    done = benchlib.run_cmds([["true"], ["sleep", "30"]], timeout=0.3)
    assert [rc for rc, _, _ in done] == [0, None] and time.monotonic() - t < 5
    assert not benchlib._LIVE


def test_cpu_meter_seconds_of_some_processes():
    m = benchlib.CpuMeter([])
    m.first = {(10, 1): 100, (11, 1): 50}
    m.last = {(10, 1): 100 + 2 * benchlib.CLK_TCK, (11, 1): 50 + benchlib.CLK_TCK,
              (12, 5): benchlib.CLK_TCK}  # 12 was born after start(): counted from 0
    m.first.setdefault((12, 5), 0)
    assert m.seconds_of({10}) == pytest.approx(2.0)
    assert m.seconds_of({11, 12}) == pytest.approx(2.0)


def _fake_bin(tmp_path, name, body):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_text("#!/bin/sh\n" + body)
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return str(d)


class SplitBackend(FakeBackend):
    def restart(self):
        self.restarted = True

    def check(self):
        pass


def _split_fwd(tmp_path, ports):
    srv = benchlib.spawn(["sleep", "30"], str(tmp_path / "srv.log"))
    fwd = tools.Forwarder("culvert --threads 2", ports[0], [srv])
    fwd.ports = ports
    return fwd


def test_split_iperf_sums_ports_and_divides_cpu_by_bytes(tmp_path, monkeypatch):
    """iperf3 to each public port at once: throughputs and bytes add up; CPU per GB
    divides by the bytes of both runs."""
    monkeypatch.setenv("PATH", _fake_bin(tmp_path, "iperf3", f"cat <<'EOF'\n{IPERF_OK}\nEOF\n")
                       + os.pathsep + os.environ["PATH"])
    fwd = _split_fwd(tmp_path, [40001, 40002])
    used = {}

    class Meter:
        def __init__(self, pids):
            used["roots"] = pids

        def start(self):
            return self

        def stop(self):
            return 3.0

        def seconds_of(self, pids):
            used["server"] = pids
            return 1.0

    monkeypatch.setattr(measures, "CpuMeter", Meter)
    be = SplitBackend(None)
    try:
        out = measures.make_run_split_iperf("two", 4)(SimpleNamespace(ab_seconds=1), fwd, be)
    finally:
        fwd.stop()
    gb = 2 * 2568355840 / 1e9
    assert be.restarted and used == {"roots": [fwd.procs[0].pid], "server": {fwd.procs[0].pid}}
    assert out["two_gbps"] == pytest.approx(2 * 20533971919.6 / 1e9)
    assert out["two_cpu_server_s_per_gb"] == pytest.approx(1.0 / gb)
    assert out["two_cpu_s_per_gb"] == pytest.approx(3.0 / gb)


def test_split_iperf_one_failed_port_fails_the_row(tmp_path, monkeypatch):
    body = (f"case \"$*\" in *40002*) echo '{{\"error\": \"unable to connect\"}}'; exit 1 ;; esac\n"
            f"cat <<'EOF'\n{IPERF_OK}\nEOF\n")
    monkeypatch.setenv("PATH", _fake_bin(tmp_path, "iperf3", body) + os.pathsep
                       + os.environ["PATH"])
    fwd = _split_fwd(tmp_path, [40001, 40002])
    try:
        out = measures.make_run_split_iperf("two", 4)(SimpleNamespace(ab_seconds=1), fwd,
                                                      SplitBackend(None))
    finally:
        fwd.stop()
    assert set(out) == {"two_gbps", "two_cpu_server_s_per_gb", "two_cpu_s_per_gb"}
    assert all(isinstance(v, Failed) and "unable to connect" in v.reason for v in out.values())


def test_split_connrate_splits_connections_and_sums_rates(tmp_path, monkeypatch):
    args = tmp_path / "wrk.args"
    body = f"echo \"$*\" >> {args}\ncat <<'EOF'\n{WRK_ERRORS}\nEOF\n"
    monkeypatch.setenv("PATH", _fake_bin(tmp_path, "wrk", body) + os.pathsep
                       + os.environ["PATH"])
    fwd = _split_fwd(tmp_path, [40001, 40002])
    try:
        out = measures.make_run_split_connrate("two")(
            SimpleNamespace(ab_seconds=1, wrk_conns=50), fwd, SplitBackend(None))
    finally:
        fwd.stop()
    assert out["two_conn_per_s"] == pytest.approx(2 * 11907.38)
    assert len(out["_notes"]) == 2 and "20 errors" in out["_notes"][0]
    lines = args.read_text().splitlines()
    assert len(lines) == 2 and all("-c25 -d1s" in x for x in lines)
    assert {x.split("/")[2] for x in lines} == {"127.0.0.1:40001", "127.0.0.1:40002"}


FAKE_TUNNEL = """\
case "$1" in
 token) echo tok ;;
 server) echo "$@" >> {args}; echo 'listening tunnel 127.0.0.1:40000'; exec sleep 30 ;;
 client) echo "$@" >> {args}
   {never}
   exec {py} -c 'import socket,time; s=socket.socket(); s.bind(("127.0.0.1",0)); s.listen()
print("exposed tcp 127.0.0.1:%d -> x" % s.getsockname()[1], flush=True); time.sleep(30)' ;;
esac
"""


def _fake_tunnel(ctx, tmp_path, never=""):
    args = tmp_path / "args"
    fake = tmp_path / "culvert"
    fake.write_text("#!/bin/sh\n" + FAKE_TUNNEL.format(args=args, py=sys.executable,
                                                       never=never))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return args


def test_tunnel_clients_one_server_a_port_per_client(ctx, tmp_path):
    args = _fake_tunnel(ctx, tmp_path)
    fwd = tools.start_tunnel_clients(ctx, "t", [7001, 7002], 2, "tls", ("--mux", "2"))
    try:
        assert len(fwd.procs) == 3 and len(set(fwd.ports)) == 2 and fwd.port == fwd.ports[0]
    finally:
        fwd.stop()
    assert not benchlib._LIVE
    srv, c1, c2 = args.read_text().splitlines()
    assert srv.startswith("server") and "--threads 2" in srv and "--transport tls" in srv
    for line, target in ((c1, 7001), (c2, 7002)):
        assert line.startswith("client 127.0.0.1:40000") and "--threads 2" in line
        assert "--mux 2" in line and line.endswith(f"-R 127.0.0.1:0:127.0.0.1:{target}")


def test_tunnel_clients_second_client_never_exposes(ctx, tmp_path):
    ctx.start_timeout = 1.0
    _fake_tunnel(ctx, tmp_path, never='[ "$(wc -l < ' + str(tmp_path / "args")
                 + ')" -ge 3 ] && exec sleep 30')
    with pytest.raises(StartError, match="no ready line"):
        tools.start_tunnel_clients(ctx, "t", [7001, 7002], 1)
    assert not benchlib._LIVE


def test_group_start_gets_the_tool_setting(ctx):
    got = []

    def start(c, tool, be):
        got.append(tool.threads)
        return tools.Forwarder(tool.name, be.port + 1, [])

    g = Group("2 clients connrate", FakeBackend, lambda c, f, b: {"x": 1.0}, ["x"],
              lambda c: 0, start=start)
    raw, _ = run.run_all(ctx, tools.THREADS_TOOLS, [g], 2, time.monotonic() + 60)
    assert got == [1, 2, 1, 2]  # interleaved run by run
    assert raw["culvert --threads 2"]["x"] == [1.0, 1.0]


def test_tunnel_section_keeps_variants_and_thread_settings_apart():
    sec = sections.SECTION_BY_NAME["tunnel"]
    threads = {g.name for g in sections.THREADS_GROUPS}
    assert threads == {"2 clients throughput", "2 clients connrate",
                       "tls 8 streams throughput", "tls 8 streams connrate"}
    assert threads <= {g.name for g in sec.groups}
    for t in sec.tools:
        runs = {g.name for g in sec.groups} - t.na
        assert runs == threads if t.threads else not runs & threads, t.name


def _threads_raw():
    A, B = "culvert --threads 1", "culvert --threads 2"
    return {
        "direct": {"tput1_gbps": [20.0, 20.0], "two_gbps": [NA, NA]},
        "culvert tunnel plain": {"tput1_gbps": [10.0, 10.0], "two_gbps": [NA, NA]},
        A: {"tput1_gbps": [NA, NA], "two_gbps": [4.0, 6.0], "two_conn_per_s": [5000.0] * 2,
            "two_cpu_server_s_per_gb": [0.5, 0.5], "two_cpu_s_per_gb": [1.0, 1.0],
            "tls8_gbps": [2.0, 2.0]},
        B: {"tput1_gbps": [NA, NA], "two_gbps": [8.0, 8.0], "two_conn_per_s": [7500.0] * 2,
            "two_cpu_server_s_per_gb": [0.6, 0.6], "two_cpu_s_per_gb": [1.2, 1.2],
            "tls8_gbps": [Failed("culvert --threads 2 did not start: boom")] * 2}}


def test_threads_ab_table_ratio_and_markdown():
    names = ["direct", "culvert tunnel plain", "culvert --threads 1", "culvert --threads 2"]
    doc = report.build_all([_sec("tunnel", _threads_raw(), names)], {**META, "elapsed_s": 1})
    tun = doc["sections"]["tunnel"]
    assert list(tun["tools"]) == ["direct", "culvert tunnel plain"]  # not in the main tables
    assert "two_gbps" not in tun["metrics"]
    ab, = tun["ab"]
    assert ab["ratio"]["two_gbps"] == pytest.approx(8.0 / 5.0)
    assert ab["ratio"]["two_cpu_server_s_per_gb"] == pytest.approx(1.2)
    assert ab["ratio"]["tls8_gbps"] is None
    assert ab["tools"]["culvert --threads 2"]["metrics"]["tls8_gbps"]["status"] == "FAILED"
    md = report.markdown(doc)
    lines = md.splitlines()
    assert "| row | metric | better | culvert --threads 1 | culvert --threads 2 | " \
           "culvert --threads 2 / culvert --threads 1 |" in lines
    row = next(x for x in lines if x.startswith("| 2 tunnel clients under load |"))
    assert "| 5.00 (4.00–6.00) | 8.00 (8.00–8.00) | 1.60x |" in row and "higher" in row
    tls = next(x for x in lines if x.startswith("| 1 TLS client with 8 streams |"))
    assert "| 2.00 (2.00–2.00) | FAILED | n/a |" in tls
    assert "tls8_conn_per_s" not in md and "visitor connections/s (wrk) (/s) | higher | 5000" in md
    assert not any(x.startswith("| culvert --threads") for x in lines)
    assert "culvert --threads 2 / tls8_gbps: FAILED: culvert --threads 2 did not start" in md
    json.dumps(doc)


def test_threads_ab_table_absent_when_its_tools_did_not_run():
    raw = {k: v for k, v in _threads_raw().items() if "--threads" not in k}
    doc = report.build_all([_sec("tunnel", raw, ["direct", "culvert tunnel plain"])], META)
    assert doc["sections"]["tunnel"]["ab"] == []
    assert sections.THREADS_TABLE.title not in report.markdown(doc)


# --------------------------------------------------------------------------- proxy, admin

import proxyload  # noqa: E402


def test_socks5_messages():
    assert proxyload.SOCKS5_GREETING == b"\x05\x01\x00"
    assert proxyload.socks5_connect_request("127.0.0.1", 8080) == \
        b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90"
    assert proxyload.parse_socks5_method(b"\x05") is None
    assert proxyload.parse_socks5_method(b"\x05\x00") == 2
    for bad, why in ((b"\x05\xff", "method 0xff"), (b"\x04\x00", "version 4")):
        with pytest.raises(ValueError, match=why):
            proxyload.parse_socks5_method(bad)
    ok4 = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x9c\x40"
    assert proxyload.parse_socks5_reply(ok4[:9]) is None
    assert proxyload.parse_socks5_reply(ok4 + b"payload") == 10
    assert proxyload.parse_socks5_reply(b"\x05\x00\x00\x04" + bytes(16) + b"\x00\x01") == 22
    assert proxyload.parse_socks5_reply(b"\x05\x00\x00\x03\x04host\x00\x50") == 11
    assert proxyload.parse_socks5_reply(b"\x05\x00\x00\x03\x04hos") is None
    for bad, why in ((b"\x05\x05\x00\x01" + bytes(6), "reply code 0x05"),
                     (b"\x05\x00\x00\x09" + bytes(6), "address type 9"),
                     (b"\x04\x5a\x00\x00\x00", "version 4")):
        with pytest.raises(ValueError, match=why):
            proxyload.parse_socks5_reply(bad)


def test_http_connect_messages():
    assert proxyload.http_connect_request("127.0.0.1", 80) == \
        b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n"
    ok = b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert proxyload.parse_http_connect_reply(ok[:-2]) is None
    assert proxyload.parse_http_connect_reply(ok + b"HTTP/1.1 200 OK") == len(ok)
    with pytest.raises(ValueError, match="CONNECT answered 407"):
        proxyload.parse_http_connect_reply(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                           b"Proxy-Authenticate: Basic\r\n\r\n")
    with pytest.raises(ValueError, match="no end of head"):
        proxyload.parse_http_connect_reply(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 20000)
    assert proxyload.http_status(b"HTTP/1.0 502 Bad Gateway\r\n") == 502
    with pytest.raises(ValueError, match="not a status line"):
        proxyload.http_status(b"SSH-2.0-OpenSSH\r\n")
    assert proxyload.get_request("/small.html").startswith(b"GET /small.html HTTP/1.1\r\n")
    assert b"Connection: close\r\n" in proxyload.get_request("/")
    assert proxyload.handshake_steps("none", "127.0.0.1", 1) == []
    assert [d for d, _ in proxyload.handshake_steps("socks5", "127.0.0.1", 1)] == \
        [b"\x05\x01\x00", b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x01"]
    with pytest.raises(ValueError):
        proxyload.handshake_steps("socks4", "127.0.0.1", 1)


# A tiny SOCKS5 (no auth, CONNECT to IPv4) and HTTP CONNECT proxy for the round trips:
# one thread per client, the first byte chooses; `refuse` answers every request with
# SOCKS5 code 0x05 / HTTP 403.
FAKE_PROXY = r"""
import socket, struct, sys, threading
refuse = sys.argv[2] == "refuse"
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def serve(c):
    first = c.recv(1, socket.MSG_PEEK)
    if first == b"\x05":
        c.recv(3)
        c.sendall(b"\x05\x00")
        req = b""
        while len(req) < 10:
            req += c.recv(10 - len(req))
        host, port = socket.inet_ntoa(req[4:8]), struct.unpack("!H", req[8:10])[0]
        if refuse:
            c.sendall(b"\x05\x05\x00\x01" + bytes(6)); c.close(); return
        u = socket.create_connection((host, port))
        c.sendall(b"\x05\x00\x00\x01" + bytes(6))
    else:
        head = b""
        while b"\r\n\r\n" not in head:
            head += c.recv(1)
        host, port = head.split()[1].decode().rsplit(":", 1)
        if refuse:
            c.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n"); c.close(); return
        u = socket.create_connection((host, int(port)))
        c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    threading.Thread(target=pump, args=(u, c), daemon=True).start()
    pump(c, u)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(128)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
HTTP_SERVER = r"""
import socket, sys, threading
def serve(c):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(4096)
        if not d:
            return c.close()
        buf += d
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(128)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


@pytest.fixture
def fake_proxies(tmp_path):
    """-> (port of a working proxy, port of a refusing one, HTTP server port, byte server
    port); all killed afterwards."""
    here = os.path.dirname(os.path.abspath(__file__))
    ports = [benchlib.free_port() for _ in range(4)]
    (tmp_path / "proxy.py").write_text(FAKE_PROXY)
    (tmp_path / "http.py").write_text(HTTP_SERVER)
    procs = [benchlib.spawn([sys.executable, str(tmp_path / "proxy.py"), str(ports[0]), "ok"],
                            str(tmp_path / "p1")),
             benchlib.spawn([sys.executable, str(tmp_path / "proxy.py"), str(ports[1]),
                             "refuse"], str(tmp_path / "p2")),
             benchlib.spawn([sys.executable, str(tmp_path / "http.py"), str(ports[2])],
                            str(tmp_path / "h")),
             benchlib.spawn([sys.executable, os.path.join(here, "probe.py"), "byte-server",
                             "--port", str(ports[3])], str(tmp_path / "b"))]
    try:
        for p, port in zip(procs, ports):
            benchlib.wait_listening(port, [p], 10)
        yield ports
    finally:
        for p in procs:
            benchlib.kill_proc(p)


def _proxyload(*args):
    here = os.path.dirname(os.path.abspath(__file__))
    rc, out, err = benchlib.run_cmd([sys.executable, os.path.join(here, "proxyload.py"),
                                     *map(str, args)], 60)
    assert rc == 0, err
    return json.loads(out)


def test_proxyload_connrate_and_firstbyte_roundtrip(fake_proxies):
    """Both handshakes and the plain mode against a real (tiny) proxy, bounded by --max;
    refusals are counted by reason, never as completed requests."""
    ok_p, refuse_p, http_p, byte_p = fake_proxies
    for via, port in (("socks5", ok_p), ("http", ok_p), ("none", http_p)):
        r = _proxyload("connrate", "--port", port, "--via", via, "--target", http_p,
                       "--conns", 4, "--seconds", 10, "--max", 30)
        assert (r["ok"], r["failed"]) == (30, 0) and r["rate"] > 0, (via, r)
    r = _proxyload("connrate", "--port", refuse_p, "--via", "socks5", "--target", http_p,
                   "--conns", 2, "--seconds", 10, "--max", 5)
    assert r == {**r, "ok": 0, "failed": 5, "errors": {"socks5: reply code 0x05": 5}}
    r = _proxyload("connrate", "--port", refuse_p, "--via", "http", "--target", http_p,
                   "--conns", 2, "--seconds", 10, "--max", 3)
    assert r["errors"] == {"http: CONNECT answered 403": 3}
    for via in ("socks5", "http"):
        r = _proxyload("firstbyte", "--port", ok_p, "--via", via, "--target", byte_p,
                       "--n", 10, "--gap-ms", 0)
        assert r["ok"] == 10 and 0 < r["p50_us"] <= r["p99_us"]
    r = _proxyload("firstbyte", "--port", refuse_p, "--via", "socks5", "--target", byte_p,
                   "--n", 3, "--gap-ms", 0)
    assert r["ok"] == 0 and "p50_us" not in r and "reply code 0x05" in r["errors"][0]


def test_memload_through_socks5(tmp_path, fake_proxies):
    """memload's client asks a SOCKS5 proxy for the sink: the sink sees every one."""
    ok_p, refuse_p, _, _ = fake_proxies
    here = os.path.dirname(os.path.abspath(__file__))
    port, status = benchlib.free_port(), str(tmp_path / "count")
    sink = benchlib.spawn([sys.executable, os.path.join(here, "memload.py"), "sink",
                           "--port", str(port), "--status", status], str(tmp_path / "s"))
    try:
        benchlib.wait_listening(port, [sink], 10)
        for proxy, want in ((ok_p, "connected 12"), (refuse_p, "partial 0 ValueError")):
            c = subprocess.run([sys.executable, os.path.join(here, "memload.py"), "client",
                                "--port", str(proxy), "--n", "12", "--batch", "5",
                                "--sink-status", status, "--timeout", "10",
                                "--socks5-target", str(port)],
                               input="close\n", capture_output=True, text=True, timeout=30)
            assert c.stdout.splitlines()[0].startswith(want), c.stdout + c.stderr
    finally:
        benchlib.kill_proc(sink)


def test_proxychains_prefix(tmp_path):
    c = SimpleNamespace(tmp=str(tmp_path))
    assert measures.proxychains_prefix(c, tools.Forwarder("culvert forward tcp", 5, [])) == ()
    fwd = tools.Forwarder("dante", 41080, [])
    fwd.via = "socks5"
    prefix = measures.proxychains_prefix(c, fwd)
    assert prefix[:3] == ("proxychains4", "-q", "-f")
    conf = open(prefix[3]).read()
    assert conf.splitlines()[-2:] == ["[ProxyList]", "socks5 127.0.0.1 41080"]
    assert "strict_chain" in conf and "proxy_dns" not in conf


def test_listening_lines_and_metrics_check():
    assert benchlib.parse_listening("listening proxy 127.0.0.1:42605", "proxy") == 42605
    assert benchlib.parse_listening("listening admin 127.0.0.1:34935\n", "admin") == 34935
    for bad in ("listening tcp 127.0.0.1:1 -> 127.0.0.1:2", "listening admin [::1]"):
        with pytest.raises(ValueError):
            benchlib.parse_listening(bad, "admin")
    page = "# HELP culvert_build_info x\n# TYPE culvert_build_info gauge\nculvert_build_info 1\n"
    assert benchlib.check_metrics_text(200, page) is None
    assert benchlib.check_metrics_text(401, page) == "HTTP 401"
    assert "no culvert_" in benchlib.check_metrics_text(200, "# nothing\n")


def _metrics_server(tmp_path, status):
    port = benchlib.free_port()
    body = "culvert_build_info 1" if status == 200 else "no"
    script = tmp_path / f"m{status}.py"
    script.write_text(
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        self.send_response({status}); self.end_headers()\n"
        f"        self.wfile.write(b'{body}' if self.path == '/metrics' else b'')\n"
        "    def log_message(self, *a): pass\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    p = benchlib.spawn([sys.executable, str(script)], str(tmp_path / f"m{status}.log"))
    benchlib.wait_listening(port, [p], 10)
    return p, port


def test_with_scrape_scrapes_once_a_second_and_fails_on_a_bad_scrape(tmp_path, monkeypatch):
    good, gport = _metrics_server(tmp_path, 200)
    bad, bport = _metrics_server(tmp_path, 500)
    try:
        scrapes = []

        def measurement(c, f, b):
            time.sleep(1.6)
            return {"tput1_gbps": 5.0, "cpu_s_per_gb": NA}

        class Counting(benchlib.MetricsScraper):
            def stop(self):
                scrapes.append(super().stop())
                return scrapes[-1]

        monkeypatch.setattr(measures, "MetricsScraper", Counting)

        run_fn = measures.with_scrape(measurement)
        fwd = tools.Forwarder("culvert --admin", 1, [])
        fwd.admin_port = gport
        out = run_fn(None, fwd, None)
        assert out["tput1_gbps"] == 5.0 and out["cpu_s_per_gb"] is NA
        assert scrapes == [(2, [])]  # at the start and a second later
        assert out["_notes"] == ["/metrics scraped once a second during every measurement, "
                                 "every scrape answered"]
        fwd.admin_port = bport
        out = run_fn(None, fwd, None)
        assert isinstance(out["tput1_gbps"], Failed) and "HTTP 500" in out["tput1_gbps"].reason
        assert out["cpu_s_per_gb"] is NA
        # a forwarder without the endpoint: the measurement alone
        assert run_fn(None, tools.Forwarder("culvert", 1, []), None) == \
            {"tput1_gbps": 5.0, "cpu_s_per_gb": NA}
    finally:
        benchlib.kill_proc(good)
        benchlib.kill_proc(bad)


def test_culvert_admin_start_reads_both_ready_lines(ctx, tmp_path):
    fake = tmp_path / "culvert"
    fake.write_text(
        "#!/bin/sh\necho \"$@\" > " + str(tmp_path / "args") + "\n"
        f"exec {sys.executable} -c 'import socket,time; s=socket.socket(); "
        "s.bind((\"127.0.0.1\",0)); s.listen()\n"
        "print(\"listening tcp 127.0.0.1:%d -> x\" % s.getsockname()[1])\n"
        "print(\"listening admin 127.0.0.1:34935\", flush=True); time.sleep(30)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    fwd = tools.start_culvert_admin(ctx, 9)
    try:
        assert fwd.admin_port == 34935 and fwd.port != 9
    finally:
        fwd.stop()
    assert (tmp_path / "args").read_text().startswith("forward tcp --admin 127.0.0.1:0 ")
    fake.write_text("#!/bin/sh\necho 'listening tcp 127.0.0.1:1 -> x'\necho oops\nsleep 30\n")
    with pytest.raises(StartError, match="listening admin"):
        tools.start_culvert_admin(ctx, 9)
    assert not benchlib._LIVE


def _proxy_raw(culvert_mem=1.5):
    C, F = "culvert proxy", "culvert forward tcp"
    return {
        F: {"tput1_gbps": [10.0, 10.0], "tput8_gbps": [12.0, 12.0],
            "socks_conn_per_s": [8000.0] * 2, "http_conn_per_s": [8000.0] * 2,
            "kib_per_conn": [0.6, 0.6]},
        C: {"tput1_gbps": [9.5, 9.5], "tput8_gbps": [10.0, 10.0],
            "socks_conn_per_s": [6000.0] * 2, "http_conn_per_s": [6500.0] * 2,
            "kib_per_conn": [culvert_mem] * 2},
        "dante": {"tput1_gbps": [6.0, 6.0], "tput8_gbps": [Failed("iperf3 timed out")] * 2,
                  "socks_conn_per_s": [4500.0] * 2, "http_conn_per_s": [NA, NA]},
        "microsocks": {"tput1_gbps": [3.0, 3.0], "tput8_gbps": [5.0, 5.0],
                       "http_conn_per_s": [NA, NA]},
        "ssh -D": {"tput1_gbps": [1.0, 1.0], "tput8_gbps": [1.0, 1.0],
                   "http_conn_per_s": [NA, NA]}}


def test_proxy_targets_against_forward_tcp_the_best_peer_and_dante():
    names = ["culvert forward tcp", "culvert proxy", "dante", "microsocks", "ssh -D"]
    doc = report.build_all([_sec("proxy", _proxy_raw(), names)], {**META, "elapsed_s": 1})
    t = {r["target"]: r for r in doc["targets"]}
    assert t["culvert proxy: throughput 1 stream ≥ 0.9× culvert forward tcp"]["holds"] is True
    r = t["culvert proxy: throughput 1 stream ≥ 1.5× the best peer"]
    assert r["holds"] is True and "(dante) = 1.58×" in r["measured"]
    assert t["culvert proxy: throughput 8 streams ≥ 0.9× culvert forward tcp"]["holds"] is False
    r = t["culvert proxy: throughput 8 streams ≥ 1.5× the best peer"]  # dante FAILED
    assert r["holds"] is True and "(microsocks) = 2.00×" in r["measured"]
    r = t["culvert proxy: new SOCKS5 connections/s ≥ 1.5× dante"]
    assert r["holds"] is False and "1.33×" in r["measured"]
    assert t["culvert proxy: ≤ 2 KiB RSS per idle proxied connection at 5,000"]["holds"] is True
    prx = doc["sections"]["proxy"]
    assert prx["ratios_to_direct"]["socks_conn_per_s"]["culvert proxy"] == pytest.approx(0.75)
    assert prx["vs_best_peer"]["tput1_gbps"]["best_peer"] == "dante"
    md = report.markdown(doc)
    assert "### Ratio to culvert forward tcp (median / culvert forward tcp's median)" in md
    row = next(x for x in md.splitlines() if x.startswith("| dante |") and "FAILED" in x)
    assert "| n/a |" in row  # HTTP CONNECT: dante does not speak it
    json.dumps(doc)
    doc = report.build_all([_sec("proxy", _proxy_raw(3.0), names, {"mem_conns": 2000})], META)
    t = {r["target"]: r for r in doc["targets"]}
    r = t["culvert proxy: ≤ 2 KiB RSS per idle proxied connection at 5,000"]
    assert r["holds"] is None and "not measured at 5,000" in r["why"]


def test_admin_section_is_one_ab_table():
    A, B = "culvert", "culvert --admin"
    raw = {A: {"tput1_gbps": [10.0, 12.0], "conn_per_s": [9000.0, 9000.0]},
           B: {"tput1_gbps": [11.0, 11.0], "conn_per_s": [Failed("admin scrape failed: x")] * 2}}
    doc = report.build_all([_sec("admin", raw, [A, B])], META)
    adm = doc["sections"]["admin"]
    assert adm["tools"] == {} and adm["ab"][0]["ratio"]["tput1_gbps"] == pytest.approx(1.0)
    assert adm["ab"][0]["ratio"]["conn_per_s"] is None
    md = report.markdown(doc)
    assert f"| {A} | {B} | {B} / {A} |" in md
    assert "| throughput | throughput 1 stream (Gbit/s) | higher | 11.00 (10.00–12.00) | " \
           "11.00 (11.00–11.00) | 1.00x |" in md
    assert "culvert --admin / conn_per_s: FAILED: admin scrape failed: x" in md


def test_proxy_and_admin_sections_select_and_budget():
    ap = run.argparse.ArgumentParser()
    got = run.select(SimpleNamespace(only="proxy,admin", tools=None, groups=None), ap)
    assert [s.name for s, _, _ in got] == ["proxy", "admin"]
    assert run.default_budget(got, quick=False) == 880 + 560 + 120
    assert run.default_budget(got, quick=True) == 170 + 150 + 40
    fwd = run.select(SimpleNamespace(only="forward", tools=None, groups=None), ap)
    assert run.default_budget(fwd, quick=False) == 880
    sec = sections.SECTION_BY_NAME["proxy"]
    assert next(t for t in sec.tools if t.baseline).name == "culvert forward tcp"
    speaks_http = [t.name for t in sec.tools if "proxy connrate http" not in t.na]
    assert speaks_http == ["culvert forward tcp", "culvert proxy"]
    assert {"danted": "dante-server", "microsocks": "microsocks",
            "proxychains4": "proxychains4"}.items() <= run.PEERS.items()


# --------------------------------------------------------------------------- ws (issue 15)

def _args_recording_culvert(tmp_path):
    """A fake culvert whose server comes up on port 40000 and whose client never exposes;
    every invocation's arguments are appended, one line each, to args.txt."""
    fake = tmp_path / "culvert"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/args.txt\ncase \"$1\" in\n"
                    " token) echo tok ;;\n"
                    " server) echo 'listening tunnel 127.0.0.1:40000'; exec sleep 30 ;;\n"
                    " client) exec sleep 30 ;;\nesac\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return tmp_path / "args.txt"


@pytest.mark.parametrize("start, server_has, client_has", [
    (tools.start_tunnel_ws, ["--transport ws", "--ws-path /tunnel"],
     ["client ws://127.0.0.1:40000/tunnel "]),
    (tools.start_tunnel_ws_inner_plain, ["--transport ws", "--inner plain"],
     ["client ws://127.0.0.1:40000/tunnel ", "--inner plain"]),
    (tools.start_tunnel_wss, ["--transport wss", "--cert ", "--key "],
     ["client wss://localhost:40000/tunnel ", "--ca "]),
    (tools.start_tunnel_wss_inner_tls, ["--transport wss", "--inner tls", "--cert "],
     ["client wss://localhost:40000/tunnel ", "--inner tls", "--ca "]),
])
def test_ws_tunnel_commands(ctx, tmp_path, start, server_has, client_has):
    """The server gets the transport and path, the client the URL (and no --transport,
    which it does not take); a client that never exposes is a StartError, all killed.
    Only the rows named for an --inner pass one: the others run the default."""
    if start in (tools.start_tunnel_wss, tools.start_tunnel_wss_inner_tls) and not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    ctx.start_timeout = 1.0
    args = _args_recording_culvert(tmp_path)
    with pytest.raises(StartError, match="no ready line"):
        start(ctx, 9)
    assert not benchlib._LIVE
    server = next(x for x in args.read_text().splitlines() if x.startswith("server "))
    client = next(x for x in args.read_text().splitlines() if x.startswith("client "))
    assert all(s in server for s in server_has), server
    assert all(s in client for s in client_has), client
    assert "--transport" not in client
    if "--inner" not in " ".join(client_has):
        assert "--inner" not in server and "--inner" not in client


@pytest.mark.skipif(not (shutil.which("nginx") and shutil.which("openssl")),
                    reason="needs nginx and openssl")
def test_ws_tunnel_behind_nginx_starts_nginx_in_front_and_kills_it(ctx, tmp_path):
    ctx.start_timeout = 1.0
    args = _args_recording_culvert(tmp_path)
    with pytest.raises(StartError, match="no ready line"):
        tools.start_tunnel_ws_nginx(ctx, 9)
    assert not benchlib._LIVE  # nginx too
    lines = args.read_text().splitlines()
    client = next(x for x in lines if x.startswith("client "))
    assert re.search(r"^client wss://localhost:\d+/tunnel .*--ca \S+ca\.pem", client), client
    assert "--transport ws " in next(x for x in lines if x.startswith("server "))
    conf = (tmp_path / "culvert_tunnel_wss_via_nginx_nginx" / "nginx.conf").read_text()
    assert "proxy_pass http://127.0.0.1:40000;" in conf


@pytest.mark.skipif(not (shutil.which("nginx") and shutil.which("openssl")),
                    reason="needs nginx and openssl")
def test_nginx_ws_conf_passes_the_upgrade_and_nginx_accepts_it(ctx, tmp_path):
    ca, cert, key = tools._certs(ctx)
    assert tools._certs(ctx) == (ca, cert, key)  # made once per temp dir
    d = tmp_path / "ng"
    d.mkdir()
    text = tools.nginx_ws_conf(str(d), 40001, 40002, cert, key, root=os.geteuid() == 0)
    for line in ("listen 127.0.0.1:40001 ssl", "location /tunnel {",
                 "proxy_pass http://127.0.0.1:40002;", "proxy_http_version 1.1;",
                 "proxy_set_header Upgrade $http_upgrade;",
                 'proxy_set_header Connection "upgrade";', f"ssl_certificate {cert};"):
        assert line in text
    (d / "nginx.conf").write_text(text)
    rc, out, err = benchlib.run_cmd(["nginx", "-t", "-c", str(d / "nginx.conf"), "-p", str(d)],
                                    timeout=20)
    assert rc == 0, err
    rc, out, err = benchlib.run_cmd(["openssl", "verify", "-CAfile", ca, cert], timeout=20)
    assert rc == 0 and "OK" in out


def _ws_raw(wss8=1.0):
    tput = {"direct": (10.0, 12.0, 20000.0), "culvert tunnel plain": (5.0, 6.0, 9000.0),
            "culvert tunnel tls": (4.0, 5.0, 8000.0), "culvert tunnel ws": (3.5, 4.0, 7500.0),
            "culvert tunnel ws --inner plain": (4.5, 4.0, 8500.0),
            "culvert tunnel wss": (3.6, wss8, 7000.0),
            "culvert tunnel wss --inner tls": (2.8, 3.2, 7000.0),
            "culvert tunnel wss via nginx": (3.0, 3.0, 5000.0)}
    return {t: {"tput1_gbps": [a, a], "tput8_gbps": [b, b], "conn_per_s": [c, c]}
            for t, (a, b, c) in tput.items()}


def test_ws_targets_against_the_tls_and_plain_tunnels():
    names = [t.name for t in sections.SECTION_BY_NAME["ws"].tools]
    raw = _ws_raw(Failed("iperf3 timed out"))
    doc = report.build_all([_sec("ws", raw, names)], META)
    t = {r["target"]: r for r in doc["targets"]}
    r = t["culvert tunnel wss: throughput 1 stream ≥ 0.9× culvert tunnel tls"]
    assert r["holds"] is True and "3.60 vs 4.00 Gbit/s = 0.90×" in r["measured"]
    assert t["culvert tunnel wss: throughput 8 streams ≥ 0.9× culvert tunnel tls"]["holds"] is None
    assert t["culvert tunnel ws --inner plain: throughput 1 stream ≥ 0.8× "
             "culvert tunnel plain"]["holds"] is True
    r = t["culvert tunnel ws --inner plain: throughput 8 streams ≥ 0.8× culvert tunnel plain"]
    assert r["holds"] is False and "0.67×" in r["measured"]
    label = sections.METRIC_BY_KEY["conn_per_s"].label
    assert t[f"culvert tunnel ws: {label} ≥ 0.9× culvert tunnel tls"]["holds"] is True
    r = t[f"culvert tunnel wss: {label} ≥ 0.9× culvert tunnel tls"]
    assert r["holds"] is False and "7000 vs 8000" in r["measured"]
    assert not any("nginx" in r["target"] for r in doc["targets"])
    md = report.markdown(doc)
    assert "| culvert tunnel wss via nginx | 3.00 " in md
    json.dumps(doc)


def test_ws_section_select_and_budget():
    ap = run.argparse.ArgumentParser()
    got = run.select(SimpleNamespace(only="ws", tools=None, groups=None, quick=True), ap)
    (sec, tl, gl), = got
    assert [g.name for g in gl] == ["throughput", "latency", "connrate"]
    assert {"culvert tunnel tls", "culvert tunnel plain"} <= {t.name for t in tl}
    assert run.default_budget(got, quick=True) == 170 + 110
    assert run.default_budget(got, quick=False) == 880 + 420
