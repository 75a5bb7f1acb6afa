"""Sections of the benchmark: each is a set of tools (tools.py) measured with a set of
groups (measures.py), reported in its own tables. `run.py --only NAME,...` picks some.

    forward     TCP forwarders side by side (culvert forward tcp, socat, haproxy, ...)
    udp         UDP forwarders: iperf3 -u at fixed offered rates (culvert forward udp, socat)
    tunnel      culvert server + client (plain, TLS) against ssh -R; first byte vs haproxy
    compress    256 MiB text / random through the plain tunnel with and without --compress
    tunnel-udp  iperf3 -u through the plain tunnel (-R udp:...)

To add a section: its tools in tools.py, its groups/metrics here, and a Section(...) in
SECTIONS; report.py renders it generically from `tables`."""
from dataclasses import dataclass, field

import tools as T
from measures import (DERIVED, GROUPS, METRICS, ByteServer, Group, Metric, RandomSource,
                      TextSource, UdpIperfServer, fetch_keys, make_run_fetch, make_run_udp,
                      run_firstbyte, udp_keys)


@dataclass
class Section:
    name: str
    title: str
    tools: list
    groups: list
    metrics: list
    tables: list                 # [(title, [metric keys])]
    derived: list = field(default_factory=list)
    # ctx values for this section: {"full": {...}, "quick": {...}} over the global ctx
    ctx: dict = field(default_factory=dict)
    intro: str = ""              # one paragraph of method, shown above the tables (format(**ctx))
    # None: the metric table layout of the forward section (report.markdown)
    generic: bool = True


# --------------------------------------------------------------------------- udp

UDP_LOADS = [("200M", 1400), ("1G", 1400), ("3G", 1400), ("3G", 8000)]
UDP_QUICK = {("200M", 1400), ("3G", 1400)}  # QUICK runs only these


def _udp_prefix(rate, length):
    return f"udp_{rate.lower()}_{length}"


UDP_METRICS, UDP_GROUPS = [], []
for _rate, _len in UDP_LOADS:
    _p = _udp_prefix(_rate, _len)
    _tag = f"{_rate} -l {_len}"
    UDP_METRICS += [
        Metric(f"{_p}_sent", f"sent {_tag}", "Mbit/s", True, "{:.0f}", vs_peer=False),
        Metric(f"{_p}_mbps", f"delivered {_tag}", "Mbit/s", True, "{:.0f}", vs_direct=True),
        Metric(f"{_p}_loss", f"loss {_tag}", "%", False, "{:.3f}"),
    ]
    UDP_GROUPS.append(Group(f"udp {_tag}", UdpIperfServer, make_run_udp(_rate, _len, _p),
                            udp_keys(_p), lambda ctx: ctx.udp_seconds + 3,
                            in_quick=(_rate, _len) in UDP_QUICK))

# --------------------------------------------------------------------------- tunnel

FB_METRICS = [
    Metric("fb_p50_us", "first byte, new conn, p50", "µs", False, "{:.0f}", True),
    Metric("fb_p99_us", "first byte, new conn, p99", "µs", False, "{:.0f}", True),
]
_G = {g.name: g for g in GROUPS}
TUNNEL_GROUPS = [
    _G["throughput"], _G["latency"],
    Group("firstbyte", ByteServer, run_firstbyte, ["fb_p50_us", "fb_p99_us"],
          lambda ctx: ctx.fb_conns * (ctx.fb_gap_ms + 1.5) / 1000 + 3),
    _G["connrate"], _G["memory"],
]

# --------------------------------------------------------------------------- compress

COMPRESS_METRICS, COMPRESS_GROUPS = [], []
for _kind, _be in (("text", TextSource), ("random", RandomSource)):
    _k = fetch_keys(_kind)
    COMPRESS_METRICS += [
        Metric(_k[0], f"{_kind}: throughput", "Gbit/s", True, "{:.2f}", vs_direct=True),
        Metric(_k[1], f"{_kind}: bytes on the wire", "MiB", False, "{:.1f}"),
        Metric(_k[2], f"{_kind}: wire / payload", "%", False, "{:.1f}"),
    ]
    COMPRESS_GROUPS.append(Group(f"compress {_kind}", _be, make_run_fetch(_kind), _k,
                                 lambda ctx: ctx.compress_bytes / 50e6 + 4))

# --------------------------------------------------------------------------- tunnel-udp

TUDP_PREFIX = "tudp"
TUDP_METRICS = [
    Metric("tudp_sent", "sent", "Mbit/s", True, "{:.0f}", vs_peer=False),
    Metric("tudp_mbps", "delivered", "Mbit/s", True, "{:.0f}", vs_direct=True),
    Metric("tudp_loss", "loss", "%", False, "{:.3f}"),
]


def _tudp_group(rate, length):
    return Group("tunnel udp", UdpIperfServer, make_run_udp(rate, length, TUDP_PREFIX),
                 udp_keys(TUDP_PREFIX), lambda ctx: ctx.udp_seconds + 4)


TUNNEL_UDP_RATE = ("500M", 1400)

# --------------------------------------------------------------------------- the list

SECTIONS = [
    Section("forward", "TCP forwarders", T.TOOLS, GROUPS, METRICS, [], DERIVED, generic=False,
            ctx={"full": {}, "quick": {}}),
    Section(
        "udp", "UDP forwarders (iperf3 -u at fixed offered rates)", T.UDP_TOOLS, UDP_GROUPS,
        UDP_METRICS,
        [("Delivered (Mbit/s, receiver side)", [_udp_prefix(r, n) + "_mbps" for r, n in UDP_LOADS]),
         ("Loss (%, receiver side)", [_udp_prefix(r, n) + "_loss" for r, n in UDP_LOADS]),
         ("Sent by the iperf3 client (Mbit/s; the offered load it reached)",
          [_udp_prefix(r, n) + "_sent" for r, n in UDP_LOADS])],
        ctx={"full": {"udp_seconds": 3}, "quick": {"udp_seconds": 1}},
        intro="`iperf3 -u -b RATE -l LEN -t {udp_seconds}` through the forwarder to `iperf3 -s` "
              "(restarted for each test), fresh forwarder per test. Delivered = receiver's "
              "`end.sum_received.bits_per_second`, loss = its `lost_percent`. culvert: "
              "`forward udp` (defaults: threads = cores, 4 MiB socket buffers) + `forward tcp` on "
              "the same port for iperf3's control connection; socat: `UDP-LISTEN:P,fork,"
              "reuseaddr UDP:127.0.0.1:T` + `TCP-LISTEN:P,fork`."),
    Section(
        "tunnel", "Tunnels: culvert server + client vs ssh -R", T.TUNNEL_TOOLS, TUNNEL_GROUPS,
        METRICS + FB_METRICS,
        [("Throughput, latency, first byte, connection rate",
          ["tput1_gbps", "tput8_gbps", "rtt_p50_us", "rtt_p99_us", "fb_p50_us", "fb_p99_us",
           "conn_per_s"]),
         ("Resources (server + client processes)",
          ["cpu_s_per_gb", "rss_idle_mib", "rss_loaded_mib", "kib_per_conn",
           "pss_kib_per_conn", "sock_mem_mib"])],
        DERIVED,
        ctx={"full": {"mem_conns": 5000, "fb_conns": 500, "fb_gap_ms": 2.0},
             "quick": {"mem_conns": 2000, "fb_conns": 200, "fb_gap_ms": 2.0}},
        intro="Visitors connect to the public port; the service is the back end on "
              "loopback. culvert: `server --transport plain|tls` + `client "
              "-R 127.0.0.1:0:127.0.0.1:T` with the defaults (visitors multiplexed on one "
              "data channel, `--mux 1`) and with `--mux 0 --pool 2` (a dedicated data "
              "channel per visitor, two kept ready; plain ones splice), and `--mux 0 "
              "--pool 0` for first byte only; ssh -R: "
              "the throwaway sshd and `ssh -N -R`; haproxy (one forwarding hop, first byte "
              "only). Same methods as the TCP table (iperf3 {tput_seconds} s, sockperf "
              "{lat_seconds} s, wrk -c{wrk_conns} {wrk_seconds} s, {mem_conns} idle "
              "connections); first byte = connect() start -> first byte from a server that "
              "writes one byte on accept, {fb_conns} sequential new connections with "
              "{fb_gap_ms} ms between them (bench/probe.py). CPU and RSS sum server and "
              "client (sshd and ssh)."),
    Section(
        "compress", "Compression through the plain tunnel", T.COMPRESS_TOOLS, COMPRESS_GROUPS,
        COMPRESS_METRICS,
        [("Download of generated data", fetch_keys("text") + fetch_keys("random"))],
        ctx={"full": {"compress_bytes": 256 * 2**20}, "quick": {"compress_bytes": 64 * 2**20}},
        intro="One visitor downloads {compress_mib} MiB from a service that sends "
              "deterministic generated data (bench/probe.py source: log-like text from a "
              "fixed vocabulary, or pseudo-random bytes), timed connect -> EOF. Bytes on the "
              "wire = `wire_down` of the server's `connection closed` log line (without "
              "--compress: `down`, which must equal the payload)."),
    Section(
        "tunnel-udp", "UDP through the plain tunnel", T.TUNNEL_UDP_TOOLS,
        [_tudp_group(*TUNNEL_UDP_RATE)], TUDP_METRICS,
        [(f"iperf3 -u -b {TUNNEL_UDP_RATE[0]} -l {TUNNEL_UDP_RATE[1]}",
          ["tudp_sent", "tudp_mbps", "tudp_loss"])],
        ctx={"full": {"udp_seconds": 3}, "quick": {"udp_seconds": 1}},
        intro="culvert client exposes the iperf3 server twice on one fixed public port P: "
              "`-R 127.0.0.1:P:127.0.0.1:T` (control) and `-R udp:127.0.0.1:P:127.0.0.1:T` "
              "(data); `iperf3 -u -t {udp_seconds}` to P."),
]
SECTION_BY_NAME = {s.name: s for s in SECTIONS}
