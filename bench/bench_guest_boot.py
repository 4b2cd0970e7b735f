"""Tiny-guest boot time: QEMU start to the first answered ping, under the accelerator kvmnet picks here.

Each round boots GUESTS guests at once (on one bridge, in a namespace of its own), pings each from the namespace,
and stops them over QMP. Boot-to-first-ping is measured per guest with a ping every ~0.5 s, so it is an upper bound
to about half a second.

    .venv/bin/python bench/bench_guest_boot.py [--rounds 5] [--guests 1]
Writes bench/results/guest_boot.md.
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kvmnet.setup import image, qemu

HERE = Path(__file__).resolve().parent


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def one_round(ns: str, run_dir: Path, img: image.GuestImage, accel: str, n: int) -> list[float]:
    guests = [(f"b{i}", f"bt{i}", f"0a:00:00:be:00:{i:02x}", f"10.98.0.{10 + i}") for i in range(n)]
    times: list[float] = [0.0] * n
    errors: list[str] = []
    try:
        t0 = []
        for name, tap, mac, ip in guests:
            argv = qemu.build_command(name=name, tap=tap, mac=mac, run_dir=run_dir, accel=accel,
                                      kernel=img.kernel, initrd=img.initrd,
                                      append=qemu.guest_append(f"{ip}/24", None, name))
            t0.append(time.monotonic())
            qemu.start(argv, netns=ns)
            sh("ip", "-n", ns, "link", "set", tap, "master", "br0", "up")

        def wait(i: int) -> None:
            try:
                qemu.wait_for_ping(ns, guests[i][3], timeout=120, progress=None)
                times[i] = time.monotonic() - t0[i]
            except TimeoutError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=wait, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for name, *_ in guests:
            qemu.stop(run_dir, name, timeout=10)
    if errors:
        raise SystemExit("; ".join(errors))
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--guests", type=int, default=1, help="guests booted at once per round")
    args = ap.parse_args()
    img = image.ensure_image(progress=lambda s: print(s, file=sys.stderr))
    accel = qemu.detect_accel()
    ns = f"kqb{secrets.token_hex(2)}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", ns, "addr", "add", "10.98.0.1/24", "dev", "br0")
        sh("ip", "-n", ns, "link", "set", "br0", "up")
        samples: list[float] = []
        with tempfile.TemporaryDirectory(prefix="kvmnet-bench-") as tmp:
            for r in range(args.rounds):
                t = one_round(ns, Path(tmp), img, accel, args.guests)
                print(f"round {r + 1}: " + " ".join(f"{x:.2f}s" for x in t), file=sys.stderr)
                samples += t
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    med, lo, hi = statistics.median(samples), min(samples), max(samples)
    line = (f"| {accel} | {args.guests} | {args.rounds} | {med:.2f} | {lo:.2f} | {hi:.2f} |")
    print(line)
    out = HERE / "results" / "guest_boot.md"
    head = ("# Tiny guest: QEMU start to first answered ping\n\n"
            f"Kernel {img.kernel.parent.name}; `bench/bench_guest_boot.py`; 2-core machine, other work running.\n\n"
            "| accel | guests at once | rounds | median s | min s | max s |\n|---|---|---|---|---|---|\n")
    text = out.read_text() if out.exists() else head
    out.write_text(text + line + "\n")


if __name__ == "__main__":
    main()
