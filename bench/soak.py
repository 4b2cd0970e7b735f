"""Soak: the real exporter under churn for a long time; does its memory stay flat?

    .venv/bin/python bench/soak.py [--duration 600] [--out bench/results/soak.md]

One namespace (ko-soak-*): a bridge with 200 stable veth ports, 100 ping targets, and taps created, enslaved and
deleted at 20 a second (a rolling window of 50). The exporter (this tree's .venv) watches it, probes the targets
every second and is scraped 5 times a second. Every 10 s: RSS, open fds, threads, scrape latency. Writes a
Markdown report with the curve. Not part of the test suite (it takes 10 minutes); run it by hand.
"""
from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORTER = os.path.join(ROOT, ".venv", "bin", "kvmnet-exporter")


def sh(*argv: str, input: str | None = None) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, input=input)


def proc_stat(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return {"rss_kb": int(out["VmRSS"].split()[0]), "threads": int(out["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "soak.md"))
    ap.add_argument("--churn", type=float, default=20, help="taps created (and deleted) per second")
    ap.add_argument("--scrapes", type=float, default=5, help="scrapes per second")
    args = ap.parse_args()

    ns = f"ko-soak-{secrets.token_hex(2)}"
    sh("ip", "netns", "add", ns)
    proc = churn = None
    try:
        batch = ["link set lo up", "link add br0 type bridge", "addr add 10.88.0.1/16 dev br0", "link set br0 up"]
        for i in range(200):
            batch += [f"link add v{i} type veth peer name w{i}", f"link set v{i} master br0 up", f"link set w{i} up"]
            if i < 100:
                batch.append(f"addr add 10.88.1.{i + 1}/16 dev w{i}")
        sh("ip", "-n", ns, "-batch", "-", input="\n".join(batch) + "\n")
        cfg = f"/tmp/{ns}.yml"
        with open(cfg, "w") as f:
            f.write(f"netns: [{ns}]\nprobe:\n  interval: 1s\n  timeout: 1s\n  targets:\n")
            for i in range(100):
                f.write(f"    - {{name: g{i}, address: 10.88.1.{i + 1}}}\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(f"/tmp/{ns}.log", "w")
        proc = subprocess.Popen([EXPORTER, "--config.file", cfg, "--web.listen-address", f"127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/metrics"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                time.sleep(0.1)

        stop = threading.Event()
        churn = subprocess.Popen(["ip", "-n", ns, "-force", "-batch", "-"], stdin=subprocess.PIPE, text=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        made = [0]

        def churner():
            n, t0 = 0, time.monotonic()
            while not stop.is_set():
                churn.stdin.write(f"tuntap add dev ch{n} mode tap\nlink set ch{n} master br0 up\n")
                if n >= 50:
                    churn.stdin.write(f"link del ch{n - 50}\n")
                churn.stdin.flush()
                n += 1
                made[0] = n
                time.sleep(max(0.0, t0 + n / args.churn - time.monotonic()))

        lat: list[float] = []
        errors = [0]
        sizes = [0]

        def scraper():
            n, t0 = 0, time.monotonic()
            while not stop.is_set():
                s = time.monotonic()
                try:
                    body = urllib.request.urlopen(url, timeout=10).read()
                    sizes[0] = body.count(b"\n")
                    lat.append(time.monotonic() - s)
                except OSError:
                    errors[0] += 1
                n += 1
                time.sleep(max(0.0, t0 + n / args.scrapes - time.monotonic()))

        threads = [threading.Thread(target=churner), threading.Thread(target=scraper)]
        for t in threads:
            t.start()
        rows = []
        start = time.monotonic()
        while time.monotonic() - start < args.duration:
            time.sleep(10)
            st = proc_stat(proc.pid)
            window, lat[:] = lat[:], []
            window.sort()
            p50 = window[len(window) // 2] * 1000 if window else float("nan")
            p99 = window[int(len(window) * 0.99)] * 1000 if window else float("nan")
            rows.append((time.monotonic() - start, st["rss_kb"], st["fds"], st["threads"], made[0], len(window),
                         p50, p99, errors[0], sizes[0]))
            print(f"t={rows[-1][0]:5.0f}s rss={st['rss_kb'] / 1024:6.1f} MiB fds={st['fds']} threads={st['threads']} "
                  f"taps_made={made[0]} scrapes={len(window)} p50={p50:.1f}ms p99={p99:.1f}ms errors={errors[0]}",
                  flush=True)
        stop.set()
        for t in threads:
            t.join()
        churn.stdin.close()
        churn.wait(timeout=60)
        text = open(log.name).read()
        write_report(args, rows, text)
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=15)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for p in (f"/tmp/{ns}.yml",):
            if os.path.exists(p):
                os.unlink(p)


def write_report(args, rows, log_text: str) -> None:
    rss = [r[1] / 1024 for r in rows]
    lo, hi = min(rss), max(rss)
    first = rss[: max(1, len(rss) // 10)]
    last = rss[-max(1, len(rss) // 10):]
    lines = [
        "# Soak: RSS under churn", "",
        f"`bench/soak.py --duration {args.duration:.0f}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores. One namespace: a bridge with 200 stable veth ports, 100 ping targets (1 s), taps "
        f"created + enslaved + deleted at {args.churn:.0f}/s (rolling window of 50), {args.scrapes:.0f} scrapes/s.", "",
        f"- taps created and deleted: {rows[-1][4]}; scrapes: {sum(r[5] for r in rows)}, failed: {rows[-1][8]}; "
        f"samples per scrape at the end: {rows[-1][9]}",
        f"- RSS: first {len(first)} samples mean {sum(first) / len(first):.1f} MiB, last {len(last)} mean "
        f"{sum(last) / len(last):.1f} MiB; min {lo:.1f}, max {hi:.1f} MiB",
        f"- tracebacks in the exporter's log: {log_text.count('Traceback')}; error lines: "
        f"{log_text.count('level=error')}", "",
        "| t (s) | RSS (MiB) | fds | threads | taps made | scrapes/10 s | p50 (ms) | p99 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t, rss_kb, fds, th, made, n, p50, p99, _err, _size in rows:
        lines.append(f"| {t:.0f} | {rss_kb / 1024:.1f} | {fds} | {th} | {made} | {n} | {p50:.1f} | {p99:.1f} |")
    lines += ["", "RSS over time (each row 10 s; bar scaled from min to max):", "", "```"]
    span = max(hi - lo, 0.1)
    for (t, *_), v in zip(rows, rss):
        lines.append(f"{t:5.0f}s {v:6.1f} MiB |" + "#" * (1 + int(40 * (v - lo) / span)))
    lines += ["```", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
