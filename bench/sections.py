"""Sections of the benchmark: each is a set of tools (tools.py) measured with a set of
groups (measures.py), reported in its own tables. `run.py --only NAME,...` picks some.

    forward     TCP forwarders side by side (culvert forward tcp, socat, haproxy, ...)
    udp         UDP forwarders: iperf3 -u at fixed offered rates (culvert forward udp, socat)
    tunnel      culvert server + client (plain, TLS) against ssh -R; first byte vs haproxy;
                --threads 1 vs 2 with two clients of one server and one TLS client
    compress    256 MiB text / random through the plain tunnel with and without --compress
    tunnel-udp  iperf3 -u through the plain tunnel (-R udp:...)
    ws          the tunnel over WebSocket (ws, ws --inner plain, wss, wss via nginx) beside
                the plain and TLS tunnels
    proxy       culvert proxy vs dante, microsocks, ssh -D; culvert forward tcp as reference
    admin       forward tcp without and with --admin (scraped once a second), alternating

To add a section: its tools in tools.py, its groups/metrics here, and a Section(...) in
SECTIONS; report.py renders it generically from `tables` (and `ab`: two tools side by
side with their ratio)."""
from dataclasses import dataclass, field, replace

import tools as T
from measures import (DERIVED, GROUPS, MEM_KEYS, METRIC_BY_KEY, METRICS, ByteServer, Group,
                      IperfServer, IperfServers, Metric, Nginx, RandomSource, Sink,
                      SockperfServer, TextSource, UdpIperfServer, fetch_keys,
                      make_run_fetch, make_run_proxy_connrate, make_run_split_connrate,
                      make_run_split_iperf, make_run_udp, run_connrate, run_firstbyte,
                      run_latency, run_memory, run_proxy_firstbyte, run_throughput,
                      split_keys, udp_keys, with_scrape)


@dataclass
class ABTable:
    """Two tools of a section side by side, metric by metric, with the ratio b / a of
    their medians (report.py). Its tools appear in no other table of the section."""
    title: str
    a: str
    b: str
    rows: list                   # [(row label, [metric keys])]


@dataclass
class Section:
    """Tools measured with groups, reported in tables of its own."""
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
    ab: list = field(default_factory=list)  # [ABTable]
    # seconds the section adds to the default time budget (full, QUICK); the sections
    # older than this field fit in the base budget (run.py)
    budget: tuple = (0, 0)


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

# Several loops: the same tunnel set-up with --threads 1 and with --threads 2 (two tools,
# interleaved run by run). Each row is a pair of groups, one load each, the tunnel
# started afresh for each: throughput (with CPU) and new visitor connections.

def _threads_groups(prefix, label, backend, clients, streams, transport, client_args=()):
    """The throughput and connection-rate groups of one A/B row: `clients` tunnel
    clients of one server, each exposing a service of the back end (cycling through its
    ports: one iperf3 server per client, one nginx for all); iperf3 -P `streams` to
    every public port at once, then wrk to all of them at once."""
    def start(ctx, tool, be):
        targets = [be.ports[i % len(be.ports)] for i in range(clients)]
        return T.start_tunnel_clients(ctx, tool.name, targets, tool.threads, transport,
                                      client_args)
    k = split_keys(prefix)
    return [
        Group(f"{label} throughput", backend, make_run_split_iperf(prefix, streams),
              [k["gbps"], k["cpu_server"], k["cpu_all"]],
              lambda ctx: ctx.ab_seconds + 6, start=start),
        Group(f"{label} connrate", Nginx, make_run_split_connrate(prefix), [k["conn_per_s"]],
              lambda ctx: ctx.ab_seconds + 4, start=start),
    ]


def _threads_metrics(prefix, load):
    k = split_keys(prefix)
    return [
        Metric(k["gbps"], f"throughput ({load})", "Gbit/s", True, "{:.2f}", vs_peer=False),
        Metric(k["conn_per_s"], "visitor connections/s (wrk)", "/s", True, "{:.0f}",
               vs_peer=False),
        Metric(k["cpu_server"], "CPU per GB, server", "CPU-s/GB", False, "{:.2f}",
               vs_peer=False),
        Metric(k["cpu_all"], "CPU per GB, server + clients", "CPU-s/GB", False, "{:.2f}",
               vs_peer=False),
    ]


# Two clients of one server, plain, the defaults (--mux 1): the server's sessions are
# what can spread over its loops. One TLS client with --mux 2: two carriers, which the
# client and the server can put on two loops (4 of the 8 streams each: a visitor goes to
# the carrier with the fewest streams); with the default --mux 1 all streams and their
# TLS records share one carrier and so one loop, and more carriers than the machine's
# two cores would add nothing a third loop could run.
THREADS_GROUPS = (
    _threads_groups("two", "2 clients", IperfServers, clients=2, streams=4, transport="plain")
    + _threads_groups("tls8", "tls 8 streams", IperfServer, clients=1, streams=8,
                      transport="tls", client_args=("--mux", "2")))
THREADS_METRICS = _threads_metrics("two", "2 × iperf3 -P 4") + _threads_metrics("tls8",
                                                                                "iperf3 -P 8")
THREADS_TABLE = ABTable(
    "Several loops: --threads 1 vs --threads 2 (server and clients alike)",
    T.THREADS_TOOLS[0].name, T.THREADS_TOOLS[1].name,
    [("2 tunnel clients under load", [m.key for m in THREADS_METRICS[:4]]),
     ("1 TLS client with 8 streams", [m.key for m in THREADS_METRICS[4:]])])

# The tunnel variants run the variant groups, the two thread settings only theirs.
_VARIANT_NAMES = {g.name for g in TUNNEL_GROUPS}
_THREADS_NAMES = {g.name for g in THREADS_GROUPS}
TUNNEL_SECTION_TOOLS = ([replace(t, na=t.na | _THREADS_NAMES) for t in T.TUNNEL_TOOLS]
                        + [replace(t, na=_VARIANT_NAMES) for t in T.THREADS_TOOLS])

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

# --------------------------------------------------------------------------- proxy

PROXY_METRICS = [
    Metric("tput1_gbps", "throughput 1 stream", "Gbit/s", True, "{:.2f}", vs_direct=True),
    Metric("tput8_gbps", "throughput 8 streams", "Gbit/s", True, "{:.2f}", vs_direct=True),
    Metric("socks_conn_per_s", "new connections/s, SOCKS5", "/s", True, "{:.0f}",
           vs_direct=True),
    Metric("http_conn_per_s", "new connections/s, HTTP CONNECT", "/s", True, "{:.0f}",
           vs_direct=True),
    Metric("fb_p50_us", "first byte, new conn, p50", "µs", False, "{:.0f}", vs_direct=True),
    Metric("fb_p99_us", "first byte, new conn, p99", "µs", False, "{:.0f}", vs_direct=True),
    METRIC_BY_KEY["cpu_s_per_gb"],
    *(METRIC_BY_KEY[k] for k in MEM_KEYS),
]
PROXY_GROUPS = [
    Group("proxy throughput", IperfServer, run_throughput,
          ["tput1_gbps", "tput8_gbps", "cpu_s_per_gb"], lambda ctx: 2 * ctx.tput_seconds + 6),
    Group("proxy connrate socks5", Nginx,
          make_run_proxy_connrate("socks_conn_per_s", "socks5"), ["socks_conn_per_s"],
          lambda ctx: ctx.wrk_seconds + 4),
    Group("proxy connrate http", Nginx, make_run_proxy_connrate("http_conn_per_s", "http"),
          ["http_conn_per_s"], lambda ctx: ctx.wrk_seconds + 4),
    Group("proxy firstbyte", ByteServer, run_proxy_firstbyte, ["fb_p50_us", "fb_p99_us"],
          lambda ctx: ctx.fb_conns * (ctx.fb_gap_ms + 2.5) / 1000 + 3),
    # danted took 26 s for 5,000 (a process per few connections)
    Group("proxy memory", Sink, run_memory, list(MEM_KEYS),
          lambda ctx: 10 + ctx.mem_conns / 200),
]

# --------------------------------------------------------------------------- admin

WS_KEYS = ["tput1_gbps", "tput8_gbps", "rtt_p50_us", "rtt_p99_us", "conn_per_s", "cpu_s_per_gb"]

_AB_ROWS = [("throughput", ["tput1_gbps", "tput8_gbps", "cpu_s_per_gb"]),
            ("latency", ["rtt_p50_us", "rtt_p99_us"]),
            ("connection rate", ["conn_per_s"])]
ADMIN_METRICS = [replace(METRIC_BY_KEY[k], vs_direct=False, vs_peer=False,
                         suspicious_above_direct=False)
                 for _, keys in _AB_ROWS for k in keys]
ADMIN_GROUPS = [
    Group("admin throughput", IperfServer, with_scrape(run_throughput),
          ["tput1_gbps", "tput8_gbps", "cpu_s_per_gb"], lambda ctx: 2 * ctx.tput_seconds + 6),
    Group("admin latency", SockperfServer, with_scrape(run_latency),
          ["rtt_p50_us", "rtt_p99_us"], lambda ctx: ctx.lat_seconds + 3),
    Group("admin connrate", Nginx, with_scrape(run_connrate), ["conn_per_s"],
          lambda ctx: ctx.wrk_seconds + 3),
]
ADMIN_TABLE = ABTable("forward tcp without and with --admin 127.0.0.1:0, /metrics scraped "
                      "once a second", T.ADMIN_TOOLS[0].name, T.ADMIN_TOOLS[1].name, _AB_ROWS)

# --------------------------------------------------------------------------- ws

WS_GROUPS = [_G["throughput"], _G["latency"], _G["connrate"]]

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
        "tunnel", "Tunnels: culvert server + client vs ssh -R", TUNNEL_SECTION_TOOLS,
        TUNNEL_GROUPS + THREADS_GROUPS, METRICS + FB_METRICS + THREADS_METRICS,
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
              "client (sshd and ssh). Several loops: one server with two plain clients "
              "(defaults), each exposing its own iperf3 server, and one TLS client with "
              "`--mux 2`, all processes at `--threads 1` and at `--threads 2`, alternating "
              "run by run; iperf3 {ab_seconds} s to every public port at once (CPU per GB "
              "over that interval), then wrk {ab_seconds} s with the -c{wrk_conns} split "
              "over the public ports; a fresh tunnel for each.",
        ab=[THREADS_TABLE]),
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
    Section(
        "ws", "Tunnels over WebSocket: ws, wss and behind nginx, with the TLS and plain "
              "tunnels", T.WS_TOOLS, WS_GROUPS, [METRIC_BY_KEY[k] for k in WS_KEYS],
        [("Throughput, latency, connection rate",
          ["tput1_gbps", "tput8_gbps", "rtt_p50_us", "rtt_p99_us", "conn_per_s"]),
         ("Resources (server + client processes, and nginx in its row)", ["cpu_s_per_gb"])],
        intro="Visitors connect to the client's public port (`-R 127.0.0.1:0:127.0.0.1:T`), "
              "all tunnels with the defaults (`--mux 1`). culvert tunnel plain / tls: "
              "`server --transport plain|tls`. ws: `server --transport ws --ws-path "
              "/tunnel` + `client ws://127.0.0.1:P/tunnel` (the token's TLS-PSK inside the "
              "WebSocket, what the default `--inner auto` does without outer TLS); ws "
              "--inner plain: both ends `--inner plain`; wss: `--transport wss "
              "--cert/--key` (a throwaway CA made with openssl) + `client "
              "wss://localhost:P/tunnel --ca CA`, the defaults: nothing terminates the "
              "TLS in between, so the ends bind the token to it and leave the TLS-PSK out "
              "(`inner=bound`); wss --inner tls: both ends `--inner tls`, TLS outside and "
              "TLS-PSK inside; wss via nginx: nginx (own config, `worker_processes 1`, "
              "TLS terminated with the same certificate, `proxy_http_version 1.1` and the "
              "Upgrade/Connection headers) in front of a `--transport ws` server, the client "
              "dialing `wss://localhost:NGINX/tunnel --ca CA`; its CPU per GB counts nginx "
              "too. iperf3 {tput_seconds} s, sockperf {lat_seconds} s, wrk -c{wrk_conns} "
              "{wrk_seconds} s as in the TCP table.",
        budget=(420, 110)),
    Section(
        "proxy", "Proxies: culvert proxy vs dante, microsocks and ssh -D", T.PROXY_TOOLS,
        PROXY_GROUPS, PROXY_METRICS,
        [("Throughput, connection rate, first byte",
          ["tput1_gbps", "tput8_gbps", "socks_conn_per_s", "http_conn_per_s", "fb_p50_us",
           "fb_p99_us"]),
         ("Resources", ["cpu_s_per_gb", "rss_idle_mib", "rss_loaded_mib", "kib_per_conn",
                        "pss_kib_per_conn", "sock_mem_mib"])],
        # mem_timeout: ssh -D had taken 4,774 of 5,000 connections after 60 s (each new
        # channel costs it more as they add up)
        ctx={"full": {"mem_conns": 5000, "fb_conns": 500, "fb_gap_ms": 2.0, "mem_timeout": 150},
             "quick": {"mem_conns": 2000, "fb_conns": 200, "fb_gap_ms": 2.0}},
        intro="Each proxy asks for the back end on 127.0.0.1 without authentication: "
              "`culvert proxy` (defaults but `--max-connections 6000`: the default cap is a "
              "quarter of the free descriptors, ~4,990 here), danted (own config, "
              "errors logged only), microsocks (1.0.3 has no -q: one log line per "
              "connection, to a file), `ssh -N -D` through the throwaway sshd. "
              "The reference is culvert's own `forward tcp` to the same back end, measured "
              "the same way without a handshake. Throughput: iperf3 {tput_seconds} s "
              "under proxychains4 (SOCKS5, the only hop) -P 1 / -P 8, CPU per GB of the "
              "proxy's processes. Connections/s: bench/proxyload.py, {wrk_conns} in flight "
              "for {wrk_seconds} s, each a new connection: handshake (SOCKS5 CONNECT, or "
              "HTTP CONNECT, which only culvert proxy speaks), GET of the ~600-byte file "
              "from nginx with `Connection: close`, read to EOF, close. First byte: "
              "{fb_conns} sequential new connections through SOCKS5 to a server that "
              "writes one byte on accept, connect() start -> that byte, {fb_gap_ms} ms "
              "apart. Memory: {mem_conns} idle connections, each through a SOCKS5 "
              "CONNECT, RSS/PSS as in the TCP table.",
        budget=(560, 150)),
    Section(
        "admin", "forward tcp with the admin endpoint", T.ADMIN_TOOLS, ADMIN_GROUPS,
        ADMIN_METRICS, [],
        intro="`culvert forward tcp` with the defaults, and the same with `--admin "
              "127.0.0.1:0` while the harness GETs `/metrics` once a second (the first at "
              "the start of each measurement; a failed scrape fails the cell). The two "
              "alternate run by run, each fresh per measurement; iperf3 {tput_seconds} s, "
              "sockperf {lat_seconds} s, wrk -c{wrk_conns} {wrk_seconds} s as in the TCP "
              "table.",
        ab=[ADMIN_TABLE], budget=(120, 40)),
]
SECTION_BY_NAME = {s.name: s for s in SECTIONS}
