#!/usr/bin/env python3
"""Ping accuracy and cost at scale: kvmnet's prober vs fping (the reference) vs smokeping_prober.

    sudo .venv/bin/python bench/bench_probe.py [--sizes 250,1000] [--out bench/results/probe.md]

For each size, one lab of light guests (a namespace + veth each, 250 per bridge since a bridge holds at most 1024
ports) is built with `ip -batch`, then, in this order on the same lab:
1. fping: per-guest RTTs (the reference), `-C` rounds at 1 s per target.
2. smokeping_prober (Debian's), privileged, 1 s interval: per-guest mean RTT from its histogram's sum/count.
3. kvmnet-exporter (the real service, only the probe collector), 1 s interval: per-guest mean RTT from sum/count,
   its CPU from /proc/PID/stat over the window, losses and any guest reported down (false downs).
   Then guests are deleted under it and we time how long until it reports them down.
4. kvmnet's prober in-process with the send time taken from the TX software timestamp vs the clock before sendto.
5. fping again: the lab did not drift.
Every namespace made here is named kbp-* and removed on exit, failure and SIGINT/SIGTERM alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PREFIX = "kbp-"
HOST = PREFIX + "h"
PER_BRIDGE = 250
ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
EXPORTER = str(ROOT / ".venv/bin/kvmnet-exporter")
KVMNET_PORT = 19848
SMOKEPING_PORT = 19374


def sh(*argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, text=True, capture_output=True, check=check)


# ---------------------------------------------------------------------------------------------------------------
# The lab

def guest_ns(i: int) -> str:
    return f"{PREFIX}g{i}"


def guest_addr(i: int) -> str:
    return f"10.210.{i // PER_BRIDGE}.{2 + i % PER_BRIDGE}"


def cleanup() -> None:
    """Remove every kbp-* namespace (ours, including leftovers of an interrupted run)."""
    names = [n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else []) if n.startswith(PREFIX)]
    if names:
        sh("ip", "-batch", "-", input="".join(f"netns del {n}\n" for n in names), check=False)


NEIGH = "/proc/sys/net/ipv4/neigh/default/gc_thresh{}"
_neigh_saved: dict[int, str] = {}


def raise_neighbour_limits(n: int) -> None:
    """The neighbour table's gc thresholds are global (one table for all namespaces, set in the initial one):
    at the default gc_thresh3=1024, 1000 guests overflow it and the kernel drops packets ("neighbor table
    overflow", table_fulls in /proc/net/stat/arp_cache). A host running 1000 guests needs this raised whatever
    pings them; we raise it for the run and put the old values back afterwards."""
    want = {1: max(128, n), 2: max(512, 4 * n), 3: max(1024, 8 * n)}
    for k, v in want.items():
        cur = Path(NEIGH.format(k)).read_text().strip()
        if int(cur) < v:
            _neigh_saved.setdefault(k, cur)
            Path(NEIGH.format(k)).write_text(str(v))
            print(f"   net.ipv4.neigh.default.gc_thresh{k}: {cur} -> {v} for the run", file=sys.stderr)


def restore_neighbour_limits() -> None:
    for k, v in _neigh_saved.items():
        Path(NEIGH.format(k)).write_text(v)
    _neigh_saved.clear()


def build(n: int) -> float:
    t0 = time.monotonic()
    sh("ip", "-batch", "-", input=f"netns add {HOST}\n" + "".join(f"netns add {guest_ns(i)}\n" for i in range(n)))
    bridges = (n + PER_BRIDGE - 1) // PER_BRIDGE
    lines = ["link set lo up"]
    for b in range(bridges):
        lines += [f"link add br{b} type bridge", f"addr add 10.210.{b}.1/24 dev br{b}", f"link set br{b} up"]
    for i in range(n):
        lines += [f"link add v{i} type veth peer name eth0 netns {guest_ns(i)}",
                  f"link set v{i} master br{i // PER_BRIDGE} up"]
    sh("ip", "-n", HOST, "-batch", "-", input="\n".join(lines) + "\n")
    procs = []
    for i in range(n):  # `ip -batch` has no per-line namespace: one small batch per guest, several at a time
        script = f"link set lo up\naddr add {guest_addr(i)}/24 dev eth0\nlink set eth0 up\n"
        p = subprocess.Popen(["ip", "-n", guest_ns(i), "-batch", "-"], stdin=subprocess.PIPE, text=True)
        p.stdin.write(script)
        p.stdin.close()
        procs.append(p)
        if len(procs) >= 32:
            for q in procs:
                q.wait()
            procs = []
    for q in procs:
        q.wait()
    return time.monotonic() - t0


def vanish(indices: list[int]) -> None:
    """Guests drop off the bridge the way a dead QEMU's tap does: the host-side port is deleted. (Deleting the
    guest's namespace instead would free its veth later, in the kernel's asynchronous namespace cleanup.)"""
    sh("ip", "-n", HOST, "-batch", "-", input="".join(f"link del v{i}\n" for i in indices))


# ---------------------------------------------------------------------------------------------------------------
# Measurements

def fping(addrs: list[str], rounds: int = 10) -> dict[str, list[float]]:
    """Per-address RTTs in seconds (lost ones left out). 1 s between rounds to each target, 1 ms between sends."""
    p = sh("ip", "netns", "exec", HOST, "fping", "-q", "-C", str(rounds), "-p", "1000", "-i", "1", "-t", "1000",
           *addrs, check=False)
    out = {}
    for line in p.stderr.splitlines():
        if " : " not in line:
            continue
        addr, vals = line.split(" : ", 1)
        out[addr.strip()] = [float(v) / 1000 for v in vals.split() if v != "-"]
    return out


def scrape(url: str, netns: str | None = None) -> str:
    if netns:
        return sh("ip", "netns", "exec", netns, "curl", "-s", "--max-time", "10", url).stdout
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def samples(text: str, name: str, key: str) -> dict[str, float]:
    """{label `key` value: sample value} for one sample name, from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[s.labels.get(key, "")] = s.value
    return out


def guest_up(text: str) -> dict[str, float]:
    """kvmnet_guest_up by guest, read with a regex: the full parser takes ~1 s on 1000 guests' output, which
    would be the resolution of the vanish timing."""
    import re
    return {m[1]: float(m[2]) for m in re.finditer(r'^kvmnet_guest_up\{[^}]*guest="([^"]*)"[^}]*\} (\S+)$', text,
                                                   re.M)}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[k]) for k in (11, 12)) / os.sysconf("SC_CLK_TCK")


def means(sum0: dict, cnt0: dict, sum1: dict, cnt1: dict) -> dict[str, float]:
    out = {}
    for k in sum1:
        c = cnt1.get(k, 0) - cnt0.get(k, 0)
        if c > 0:
            out[k] = (sum1[k] - sum0.get(k, 0)) / c
    return out


def p50(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def wait_scrape(url: str, netns: str | None, proc: subprocess.Popen, log, timeout: float = 60) -> str:
    """The first successful scrape of a process that is still starting (smokeping_prober staggers its pingers)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{proc.args[3]} exited {proc.returncode}: {log.read()[-2000:]}")
        try:
            text = scrape(url, netns)
            if text:
                return text
        except (OSError, subprocess.CalledProcessError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


def run_smokeping(addrs: list[str], seconds: float) -> dict:
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(["ip", "netns", "exec", HOST, "prometheus-smokeping-prober", "--privileged",
                             f"--web.listen-address=127.0.0.1:{SMOKEPING_PORT}", "--ping.interval=1s",
                             "--config.file=/nonexistent/smokeping_prober.yml", *addrs],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{SMOKEPING_PORT}/metrics"
        wait_scrape(url, HOST, proc, log, timeout=300)  # it starts its pingers one by one: ~30 s at 1000
        time.sleep(5)  # every pinger past its first round
        t0 = scrape(url, HOST)
        c0, w0 = cpu_seconds(proc.pid), time.monotonic()  # `ip netns exec` execs it: same pid
        time.sleep(seconds)
        t1 = scrape(url, HOST)
        cpu = 100 * (cpu_seconds(proc.pid) - c0) / (time.monotonic() - w0)
        s = "smokeping_response_duration_seconds"
        m = means(samples(t0, s + "_sum", "ip"), samples(t0, s + "_count", "ip"),
                  samples(t1, s + "_sum", "ip"), samples(t1, s + "_count", "ip"))
        return {"per_guest_mean": m, "guests_with_replies": len(m), "cpu_percent": cpu}
    finally:
        proc.terminate()
        proc.wait()


def run_kvmnet(n: int, addrs: list[str], seconds: float, vanish_count: int) -> dict:
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write(f"netns: [{HOST}]\nprobe:\n  interval: 1s\n  timeout: 1s\n  discover: false\n  targets:\n")
    for i, a in enumerate(addrs):
        cfg.write(f"    - {{name: g{i}, address: {a}}}\n")
    cfg.close()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([EXPORTER, "--config.file", cfg.name, f"--web.listen-address=127.0.0.1:{KVMNET_PORT}",
                             "--no-collector.bridge", "--no-collector.fdb", "--no-collector.identity"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{KVMNET_PORT}/metrics"
    try:
        time.sleep(6)  # sockets open, ARP resolved, first replies in
        names = {f"g{i}" for i in range(n)}
        h = "kvmnet_guest_ping_rtt_seconds"
        text0 = scrape(url)
        cpu0, w0 = cpu_seconds(proc.pid), time.monotonic()
        downs: set[str] = set()
        # Scrape every 10 s, as Prometheus would (the scrape's cost is in the CPU figure).
        end = w0 + seconds
        while time.monotonic() < end:
            time.sleep(min(10, max(end - time.monotonic(), 0)))
            text = scrape(url)
            downs |= {g for g, v in guest_up(text).items() if v == 0}
        cpu1, w1 = cpu_seconds(proc.pid), time.monotonic()
        text1 = text
        m = means(samples(text0, h + "_sum", "guest"), samples(text0, h + "_count", "guest"),
                  samples(text1, h + "_sum", "guest"), samples(text1, h + "_count", "guest"))
        req0, req1 = samples(text0, "kvmnet_guest_ping_requests_total", "guest"), \
            samples(text1, "kvmnet_guest_ping_requests_total", "guest")
        rep0, rep1 = samples(text0, "kvmnet_guest_ping_replies_total", "guest"), \
            samples(text1, "kvmnet_guest_ping_replies_total", "guest")
        # A probe sent just before a scrape may still be in flight: allow one per guest per scrape.
        lost = sum(max((req1[g] - req0[g]) - (rep1[g] - rep0[g]) - 1, 0) for g in names)
        requests = sum(req1[g] - req0[g] for g in names)
        # A guest vanishes: how long until kvmnet says so?
        gone = list(range(0, n, max(n // vanish_count, 1)))[:vanish_count]
        t_gone = time.monotonic()
        vanish(gone)
        pending = {f"g{i}" for i in gone}
        took: dict[str, float] = {}
        while pending and time.monotonic() - t_gone < 15:
            time.sleep(0.05)
            asked = time.monotonic()  # the state in the response is at least this recent
            up = guest_up(scrape(url))
            for g in list(pending):
                if up.get(g) == 0:
                    took[g] = asked - t_gone
                    pending.discard(g)
        up = guest_up(scrape(url))
        downs |= {g for g, v in up.items() if v == 0 and g not in {f"g{i}" for i in gone}}
        return {"per_guest_mean": {addrs[int(g[1:])]: v for g, v in m.items()},
                "cpu_percent": 100 * (cpu1 - cpu0) / (w1 - w0), "window_s": w1 - w0,
                "requests": requests, "lost": lost, "false_downs": sorted(downs),
                "vanished": len(gone), "vanished_indices": gone, "down_after_s": sorted(took.values()), "never_down": sorted(pending)}
    finally:
        proc.terminate()
        proc.wait()
        log.seek(0)
        errors = [l for l in log.read().splitlines() if "level=error" in l or "Traceback" in l]
        if errors:
            print("kvmnet log errors:", *errors[:5], sep="\n  ", file=sys.stderr)
        os.unlink(cfg.name)
        os.unlink(log.name)


INPROC = r"""
import asyncio, ipaddress, json, os, sys, time
from kvmnet.exporter.prober.engine import Prober
from kvmnet.exporter.prober.targets import Target
addrs, host, tx, seconds = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "tx", float(sys.argv[4])
async def main():
    p = Prober(interval=1.0, timeout=1.0, tx_timestamps=tx)
    p.set_targets([Target(a, ipaddress.ip_address(a), host) for a in addrs])
    await p.start(); await asyncio.sleep(4)
    before = {k: (s.rtt_sum, sum(s.buckets)) for k, s in p.states.items()}
    c0 = sum(os.times()[:2]); t0 = time.monotonic()
    await asyncio.sleep(seconds)
    cpu = 100 * (sum(os.times()[:2]) - c0) / (time.monotonic() - t0)
    await p.stop()
    out = {}
    for k, s in p.states.items():
        n = sum(s.buckets) - before[k][1]
        if n:
            out[s.target.name] = (s.rtt_sum - before[k][0]) / n
    print(json.dumps({"per_guest_mean": out, "cpu_percent": cpu}))
asyncio.run(main())
"""


def run_inproc(addrs: list[str], tx: bool, seconds: float) -> dict:
    p = sh(PY, "-c", INPROC, json.dumps(addrs), HOST, "tx" if tx else "clock", str(seconds))
    return json.loads(p.stdout)


# ---------------------------------------------------------------------------------------------------------------

def bench(n: int, seconds: float) -> dict:
    print(f"== {n} guests", file=sys.stderr)
    raise_neighbour_limits(n)
    load_before = os.getloadavg()
    built = build(n)
    addrs = [guest_addr(i) for i in range(n)]
    print(f"   built in {built:.1f} s", file=sys.stderr)
    fping(addrs, rounds=2)  # warm: ARP resolved, caches hot
    ref = fping(addrs)
    fp = {a: statistics.fmean(v) for a, v in ref.items() if v}
    fp_p50_all = p50(x for v in ref.values() for x in v)
    print(f"   fping: {len(fp)} guests answered", file=sys.stderr)
    smoke = run_smokeping(addrs, seconds)
    print(f"   smokeping_prober: {smoke['guests_with_replies']} guests", file=sys.stderr)
    tx = run_inproc(addrs, True, min(seconds, 15))
    clock = run_inproc(addrs, False, min(seconds, 15))
    print("   in-process variants done", file=sys.stderr)
    kv = run_kvmnet(n, addrs, seconds, vanish_count=10)
    print(f"   kvmnet: cpu {kv['cpu_percent']:.1f}%", file=sys.stderr)
    alive = [guest_addr(i) for i in range(n) if i not in kv["vanished_indices"]]
    after = fping(alive, rounds=5)
    cleanup()
    return {"guests": n, "build_s": built, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "fping": {"p50_of_means": p50(fp.values()), "p50_all_rtts": fp_p50_all, "guests": len(fp)},
            "fping_after": {"p50_of_means": p50(statistics.fmean(v) for v in after.values() if v)},
            "smokeping": {"p50_of_means": p50(smoke["per_guest_mean"].values()),
                          "guests": smoke["guests_with_replies"], "cpu_percent": smoke["cpu_percent"]},
            "kvmnet": {**{k: v for k, v in kv.items() if k != "per_guest_mean"},
                       "p50_of_means": p50(kv["per_guest_mean"].values()), "guests": len(kv["per_guest_mean"])},
            "kvmnet_tx_timestamp": {"p50_of_means": p50(tx["per_guest_mean"].values()),
                                    "cpu_percent": tx["cpu_percent"]},
            "kvmnet_clock_before_sendto": {"p50_of_means": p50(clock["per_guest_mean"].values()),
                                           "cpu_percent": clock["cpu_percent"]}}


def us(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e6:.1f} us"


def report(results: list[dict], seconds: float) -> str:
    uname = platform.uname()
    lines = [
        "# Prober benchmark: kvmnet vs fping vs smokeping_prober",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores, kernel "
        f"{uname.release}, by `bench/bench_probe.py`. Light guests: a namespace + veth each, {PER_BRIDGE} per "
        f"bridge, all in one host namespace; 1 s interval, {seconds:.0f} s windows, 56-byte payloads.",
        "",
        "RTT column: the p50 over guests of each guest's mean RTT (kvmnet and smokeping_prober from their "
        "histogram's sum/count over the window; fping from 10 rounds). Goal: kvmnet <= 2 x fping + 50 us.",
        "",
        "| guests | fping | smokeping_prober | kvmnet | kvmnet / goal | kvmnet CPU (1 core) | lost probes | "
        "false downs | vanished -> down (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f, k = r["fping"]["p50_of_means"], r["kvmnet"]
        goal = 2 * f + 50e-6 if f is not None else None
        ratio = k["p50_of_means"] / goal if goal and k["p50_of_means"] is not None else None
        downs = k["down_after_s"]
        down_txt = f"{max(downs):.1f} s ({len(downs)}/{k['vanished']})" if downs else "-"
        if k["never_down"]:
            down_txt += " NEVER: " + ",".join(k["never_down"])
        lines.append(
            f"| {r['guests']} | {us(f)} | {us(r['smokeping']['p50_of_means'])} | {us(k['p50_of_means'])} | "
            f"{'-' if ratio is None else f'{ratio:.2f} ({us(goal)})'} | {k['cpu_percent']:.1f}% | "
            f"{k['lost']} of {k['requests']} | {len(k['false_downs'])} | "
            f"{down_txt} |")
    lines += ["", "Send time source (kvmnet's prober in-process, same lab, RX always the kernel timestamp):", "",
              "| guests | fping | TX software timestamp (default) | clock before sendto |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['guests']} | {us(r['fping']['p50_of_means'])} | "
                     f"{us(r['kvmnet_tx_timestamp']['p50_of_means'])} | "
                     f"{us(r['kvmnet_clock_before_sendto']['p50_of_means'])} |")
    lines += ["", "Load average (1 min) before/after each size, the machine being shared: " + ", ".join(
        f"{r['guests']}: {r['loadavg_before'][0]:.1f}/{r['loadavg_after'][0]:.1f}" for r in results) + "."]
    lines += ["", "smokeping_prober CPU: " + ", ".join(f"{r['guests']}: {r['smokeping']['cpu_percent']:.1f}%"
                                                    for r in results) + " of one core.", ""]
    lines += ["", "fping again at the end (the lab did not drift): " +
              ", ".join(f"{r['guests']}: {us(r['fping_after']['p50_of_means'])}" for r in results), "",
              "Raw numbers: `bench/results/probe.json`.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="250,1000")
    ap.add_argument("--seconds", type=float, default=30.0, help="measurement window per tool")
    ap.add_argument("--out", default=str(ROOT / "bench/results/probe.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_probe: needs root (network namespaces)", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cleanup()
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for n in (int(x) for x in args.sizes.split(",")):
            results.append(bench(n, args.seconds))
            out.write_text(report(results, args.seconds))  # after each size: a later failure keeps these
            out.with_suffix(".json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    finally:
        cleanup()
        restore_neighbour_limits()
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
