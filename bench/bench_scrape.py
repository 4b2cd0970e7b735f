"""Scrape cost of kvmnet-exporter against node_exporter's netdev collector, end to end over HTTP.

    sudo .venv/bin/python bench/bench_scrape.py                       # 100 / 1000 / 4000 taps, writes bench/results/scrape.md
    sudo .venv/bin/python bench/bench_scrape.py --sizes 1000 --rounds 50 --no-write

For each size it builds one namespace (removed afterwards) holding N taps on ceil(N/1000) bridges (a bridge takes
at most 1024 ports) and 4 static FDB entries per tap, with IPv6 off so nothing moves. Then:
- node_exporter runs INSIDE the namespace (`ip netns exec`), `--collector.disable-defaults --collector.netdev`,
  listening on that namespace's 127.0.0.1; we reach it with a socket created inside the namespace.
- kvmnet-exporter runs in our namespace with `--netns NS --no-collector.probe` (bridge, fdb and identity on: what
  a user runs), on 127.0.0.1.
Both are asked as Prometheus 2.42 asks (its Accept header, Accept-Encoding: gzip, keep-alive), interleaved in the
same run, the order alternating each round; a sample is request sent -> compressed body fully read. RSS is
kvmnet's VmRSS/VmHWM after the run.
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import math
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kvmnet.common import netns as nsmod  # noqa: E402

ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
          "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")  # Prometheus 2.42's scrape Accept header
HEADERS = {"Accept": ACCEPT, "Accept-Encoding": "gzip", "User-Agent": "Prometheus/2.42.0",
           "X-Prometheus-Scrape-Timeout-Seconds": "10"}
PER_BRIDGE = 1000


def build(ns: str, taps: int, fdb_per_tap: int) -> int:
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1"], check=True)
    bridges = math.ceil(taps / PER_BRIDGE)
    cmds = ["link set lo up"]
    for b in range(bridges):
        cmds += [f"link add br{b} type bridge", f"link set br{b} up"]
    for i in range(taps):
        cmds += [f"tuntap add dev tap{i} mode tap", f"link set tap{i} master br{i // PER_BRIDGE} up"]
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds), text=True, check=True)
    fdb = [f"fdb add 02:{(j >> 24) & 255:02x}:{(j >> 16) & 255:02x}:{(j >> 8) & 255:02x}:{j & 255:02x}:01 "
           f"dev tap{j % taps} master static" for j in range(taps * fdb_per_tap)]
    subprocess.run(["bridge", "-n", ns, "-batch", "-"], input="\n".join(fdb), text=True, check=True)
    return bridges


class Target:
    """A keep-alive HTTP client; for node_exporter its socket is made inside the namespace."""

    def __init__(self, name: str, port: int, netns: str = "") -> None:
        self.name, self.port, self.netns = name, port, netns
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        if self.netns:
            s = nsmod.socket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(("127.0.0.1", self.port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock = s
        return conn

    def get(self) -> tuple[float, bytes, dict]:
        if self.conn is None:
            self.conn = self._connect()
        t0 = time.perf_counter()
        self.conn.request("GET", "/metrics", headers=HEADERS)
        resp = self.conn.getresponse()
        body = resp.read()
        dt = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}")
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = None
        return dt, body, dict(resp.getheaders())

    def wait(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get()
                return
            except (OSError, http.client.HTTPException, RuntimeError):
                self.conn = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def series(body: bytes, headers: dict) -> int:
    if headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))


def rss_kb(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    get = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1))  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_size(taps: int, rounds: int, fdb_per_tap: int, log_dir: Path, prefix: str = "kn") -> dict:
    ns = f"{prefix}-bench{taps}-{secrets.token_hex(2)}"
    procs: list[subprocess.Popen] = []
    try:
        t0 = time.monotonic()
        bridges = build(ns, taps, fdb_per_tap)
        build_s = time.monotonic() - t0
        node_port, kvm_port = free_port(), free_port()
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, "prometheus-node-exporter", "--collector.disable-defaults",
             "--collector.netdev", f"--web.listen-address=127.0.0.1:{node_port}"],
            stdout=subprocess.DEVNULL, stderr=open(log_dir / f"node-{taps}.log", "w")))
        kvm = subprocess.Popen(
            [str(ROOT / ".venv/bin/kvmnet-exporter"), "--netns", ns, "--no-collector.probe",
             "--web.listen-address", f"127.0.0.1:{kvm_port}"],
            stdout=subprocess.DEVNULL, stderr=open(log_dir / f"kvmnet-{taps}.log", "w"))
        procs.append(kvm)
        node, kvmnet = Target("node_exporter", node_port, ns), Target("kvmnet", kvm_port)
        node.wait()
        kvmnet.wait()
        for _ in range(5):  # warm up both (kvmnet's first scrape does the full dumps)
            node.get()
            kvmnet.get()
        times: dict[str, list[float]] = {"kvmnet": [], "node_exporter": []}
        last: dict[str, tuple[bytes, dict]] = {}
        for r in range(rounds):
            order = (kvmnet, node) if r % 2 == 0 else (node, kvmnet)
            for t in order:
                dt, body, hdrs = t.get()
                times[t.name].append(dt)
                last[t.name] = (body, hdrs)
                time.sleep(0.02)
        rss, hwm = rss_kb(kvm.pid)
        kbody = gzip.decompress(last["kvmnet"][0]).decode()
        coll = {m.group(1): float(m.group(3)) for m in re.finditer(
            r'^kvmnet_scrape_collector_duration_seconds\{collector="([^"]+)",netns="([^"]*)"\} (\S+)$', kbody, re.M)
            if m.group(2) == ns}
        return {
            "taps": taps, "bridges": bridges, "fdb_static": taps * fdb_per_tap, "build_s": build_s,
            "kvm_p50": pct(times["kvmnet"], 50), "kvm_p90": pct(times["kvmnet"], 90),
            "node_p50": pct(times["node_exporter"], 50), "node_p90": pct(times["node_exporter"], 90),
            "kvm_series": series(*last["kvmnet"]), "node_series": series(*last["node_exporter"]),
            "kvm_gz": len(last["kvmnet"][0]), "node_gz": len(last["node_exporter"][0]),
            "kvm_ctype": last["kvmnet"][1].get("Content-Type"), "node_ctype": last["node_exporter"][1].get("Content-Type"),
            "rss_mb": rss / 1024, "hwm_mb": hwm / 1024, "collectors": coll, "rounds": rounds,
            "load": os.getloadavg()[0],
        }
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def report(results: list[dict], node_version: str) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    lines = [
        "# Scrape benchmark: kvmnet-exporter vs node_exporter netdev",
        "",
        f"Made by `bench/bench_scrape.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, {node_version}.",
        "",
        "Each size: one namespace, N taps on ceil(N/1000) bridges, 4 static FDB entries per tap. node_exporter "
        "(`--collector.disable-defaults --collector.netdev`) runs inside the namespace; kvmnet-exporter "
        "(`--netns NS --no-collector.probe`: bridge, fdb and identity collectors) runs outside and watches it. Both "
        "asked as Prometheus 2.42 asks (Accept header, gzip, keep-alive), interleaved in the same run; time is "
        "request sent to the compressed body read.",
        "",
        "| taps | bridges | static FDB | kvmnet p50 ms | kvmnet p90 ms | node p50 ms | node p90 ms | ratio p50 | "
        "kvmnet series | node series | kvmnet RSS MB (peak) | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['taps']} | {r['bridges']} | {r['fdb_static']} | {ms(r['kvm_p50'])} | {ms(r['kvm_p90'])} "
                     f"| {ms(r['node_p50'])} | {ms(r['node_p90'])} | {r['kvm_p50'] / r['node_p50']:.2f} "
                     f"| {r['kvm_series']} | {r['node_series']} | {r['rss_mb']:.1f} ({r['hwm_mb']:.1f}) | {r['load']:.1f} |")
    lines += ["", "kvmnet's own per-collector time in the last scrape (kvmnet_scrape_collector_duration_seconds, "
              "watched namespace):", ""]
    for r in results:
        lines.append(f"- {r['taps']} taps: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(r["collectors"].items())))
    lines += ["", f"Content types served: kvmnet `{results[-1]['kvm_ctype']}`, node_exporter "
              f"`{results[-1]['node_ctype']}`. Rounds per size: {results[-1]['rounds']}.", "", NOTES]
    return "\n".join(lines)


NOTES = """## Notes

- Where kvmnet's time goes (1000 taps, in process, see exporter/sources/netlink.py): `snapshot()` 2-3 ms (one
  RTM_GETSTATS dump for the counters; topology, STP state and FDB are kept current from netlink events), rendering
  ~4 ms for the bridge collector and ~1.5 ms for fdb (line prefixes cached per port). The rest of the end-to-end time
  is the web layer (aiohttp, gzip level 1 of ~1.5 MB, the identity collector, self-metrics).
- Full dumps on every scrape were measured at ~66 ms for 1000 taps (link dump 7 + decode 22, FDB dump 23 +
  decode 14): no better than node_exporter. They now happen once, on FDB overflow (ENOBUFS) and every 300 s
  (`kvmnet_netlink_resyncs_total`); a scrape that hits one costs ~70 ms more at 1000 taps.
- pyroute2's socket layer with a trivial `parser=` took 11.7 ms / 61 ms for the link / FDB dumps against 6.8 / 20.6 ms
  on a plain socket, and is bound to the thread that made it, so kvmnet uses plain AF_NETLINK sockets.
- The machine is shared with other work; node_exporter's own times move by +-30% between runs, and ratios are only
  comparable within one run (which is why both are asked interleaved).
- RSS includes the exporter's baseline (Python, aiohttp, pydantic, prometheus_client): ~50 MB with nothing to
  watch. Growth is ~10-15 MB per 1000 taps (cached line prefixes ~2.5 kB per port, the FDB table, and the transient
  text of one scrape: ~1.5 MB per 1000 taps, rendered then gzipped).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,4000")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--fdb-per-tap", type=int, default=4)
    ap.add_argument("--no-write", action="store_true", help="print, do not write bench/results/scrape.md")
    ap.add_argument("--netns-prefix", default="kn", help="first part of the benchmark namespace's name")
    args = ap.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="kn-bench-logs-"))  # the exporters' stderr, if something goes wrong
    print(f"logs in {log_dir}")
    node_version = subprocess.run(["prometheus-node-exporter", "--version"], capture_output=True,
                                  text=True)
    node_version = (node_version.stdout + node_version.stderr).splitlines()[0]
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        r = run_size(n, args.rounds, args.fdb_per_tap, log_dir, args.netns_prefix)
        print(f"{n} taps: kvmnet p50 {r['kvm_p50'] * 1e3:.1f} ms p90 {r['kvm_p90'] * 1e3:.1f} | node p50 "
              f"{r['node_p50'] * 1e3:.1f} ms p90 {r['node_p90'] * 1e3:.1f} | ratio {r['kvm_p50'] / r['node_p50']:.2f} "
              f"| RSS {r['rss_mb']:.1f} MB | series {r['kvm_series']}/{r['node_series']} | {r['collectors']}",
              flush=True)
        results.append(r)
    text = report(results, node_version)
    if args.no_write:
        print(text)
    else:
        out = ROOT / "bench" / "results" / "scrape.md"
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
