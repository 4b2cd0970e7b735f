"""How far does memory grow with the number of distinct device names ever seen? (The soak's slow RSS rise.)

    .venv/bin/python bench/soak_names.py [--names 300000] [--batch 1000]

The soak (bench/soak.py) churns taps with new names and RSS rises ~0.8 kB per name. Creating 300k real taps takes
hours (~50 a second through `ip -batch` with 1000 on a bridge), so this feeds the collectors' rendering path
(bridge_families, fdb_families, render: what every scrape runs, with the same caches) snapshots of one bridge with
BATCH ports whose names were never used before, then an empty one (the taps deleted). RSS after every 10 rounds.
Appends its table to bench/results/soak.md.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kvmnet.exporter import exposition  # noqa: E402
from kvmnet.exporter.collectors.bridge import _Rows, bridge_families  # noqa: E402
from kvmnet.exporter.collectors.fdb import fdb_families  # noqa: E402
from kvmnet.exporter.sources.netlink import Bridge, BridgeSnapshot, Counters, FdbCounts, Port  # noqa: E402


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def snapshot(names: list[str]) -> BridgeSnapshot:
    ports = [Port(index=i + 10, name=n, kind="tun", mac=f"0a:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                  flags=0x10000, carrier_changes=1, stp_state=3, stats=Counters(*range(8)), fdb=FdbCounts(1, 0, 1))
             for i, n in enumerate(names)]
    br = Bridge(index=2, name="br0", mac="0a:00:00:00:00:01", flags=0x10000, carrier_changes=1, stp_enabled=False,
                stats=Counters(*range(8)), ports=ports, fdb=FdbCounts(len(ports) + 1, 0, len(ports)))
    return BridgeSnapshot(netns="ko-names", bridges=[br])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=300_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "soak.md"))
    args = ap.parse_args()
    rows, cache = _Rows(), {}

    def scrape(snap):
        return exposition.render(bridge_families(snap, rows=rows) + fdb_families(snap, cache=cache))

    scrape(snapshot([]))
    out = [(0, rss_mib())]
    start = time.monotonic()
    for r in range(args.names // args.batch):
        scrape(snapshot([f"tap{r}x{i}" for i in range(args.batch)]))
        scrape(snapshot([]))
        if (r + 1) % 10 == 0:
            gc.collect()
            out.append(((r + 1) * args.batch, rss_mib()))
            print(f"names={out[-1][0]} rss={out[-1][1]:.1f} MiB t={time.monotonic() - start:.0f}s", flush=True)
    lines = ["", "## RSS against distinct device names ever seen (`bench/soak_names.py`)", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.names} port names never seen before, "
             f"{args.batch} per scrape then removed, through bridge_families + fdb_families + render in one "
             "process (the scrape path and its caches, without the kernel).", "",
             "| names seen | RSS (MiB) |", "|---:|---:|"]
    lines += [f"| {n} | {m:.1f} |" for n, m in out]
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
