"""Provisioning speed: kvmnet-setup vs iproute2 `ip -batch`, same topology, same run.

Topology: a host namespace with br0, 200 taps on br0, and 100 light guests (a namespace each, a veth with its host
end on br0, an address and a MAC on the guest end, lo up).

    kvmnet-setup up -c LAB.yaml         the whole CLI as a user runs it (Python start-up included)
    ip -batch                           1 batch for the namespaces, 1 inside the host namespace (bridge, taps,
                                        veths, enslaving), then 1 `ip -n GUEST -batch` per guest (address, MAC, up):
                                        `ip -batch` cannot switch namespace per line, so this is the fewest processes

Both are checked with `ip -j` (same port count, guests addressed) and torn down between rounds. Goal: kvmnet <= 2x.

    .venv/bin/python bench/bench_setup.py [--rounds 3] [--taps 200] [--guests 100]
Writes bench/results/setup.md.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SETUP = [sys.executable, "-m", "kvmnet.setup.cli"]
# Deleting a namespace returns at once; the kernel tears it down in the background (cleanup_net), contending for
# the locks the next build needs. Wait this long after every teardown so neither side pays for the other's.
SETTLE = 3.0


def lab(tag: str, taps: int, guests: int) -> dict:
    return {
        "name": tag,
        "namespaces": {"host": f"{tag}-h"},
        "bridges": [{"name": "br0", "address": "10.200.0.1/16"}],
        "taps": [{"name": f"t{i}", "bridge": "br0"} for i in range(taps)],
        "guests": [{"name": f"g{i}", "kind": "netns", "tap": f"g{i}h", "bridge": "br0",
                    "address": f"10.200.{1 + i // 250}.{1 + i % 250}/16", "mac": f"0a:00:00:00:{i // 256:02x}:{i % 256:02x}"}
                   for i in range(guests)],
    }


def run(argv, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, argv[:4]))}... failed: {p.stderr.strip()[:300]}")
    return p


def check(d: dict, taps: int, guests: int) -> None:
    host = d["namespaces"]["host"]
    ports = json.loads(run(["bridge", "-n", host, "-j", "link", "show"]).stdout)
    n = sum(1 for p in ports if p.get("master") == "br0")
    assert n == taps + guests, f"{n} ports on br0, expected {taps + guests}"
    last = d["guests"][-1]
    out = json.loads(run(["ip", "-n", f"{host}-{last['name']}", "-j", "addr", "show", "eth0"]).stdout)[0]
    assert out["address"] == last["mac"] and "UP" in out["flags"], out
    assert any(f"{a['local']}/{a['prefixlen']}" == last["address"] for a in out["addr_info"]), out


def ip_batch(d: dict) -> float:
    host = d["namespaces"]["host"]
    gns = [f"{host}-{g['name']}" for g in d["guests"]]
    nslines = [f"netns add {n}" for n in [host, *gns]]
    hostlines = ["link set lo up", "link add br0 type bridge", "addr add 10.200.0.1/16 dev br0", "link set br0 up"]
    for t in d["taps"]:
        hostlines += [f"tuntap add {t['name']} mode tap", f"link set {t['name']} master br0 up"]
    for g, n in zip(d["guests"], gns):
        hostlines += [f"link add {g['tap']} type veth peer name eth0 netns {n}", f"link set {g['tap']} master br0 up"]
    t0 = time.perf_counter()
    run(["ip", "-batch", "-"], input="\n".join(nslines) + "\n")
    run(["ip", "-n", host, "-batch", "-"], input="\n".join(hostlines) + "\n")
    for g, n in zip(d["guests"], gns):
        run(["ip", "-n", n, "-batch", "-"], input=f"link set lo up\nlink set eth0 address {g['mac']}\n"
                                                  f"addr add {g['address']} dev eth0\nlink set eth0 up\n")
    return time.perf_counter() - t0


def ip_cleanup(d: dict) -> float:
    host = d["namespaces"]["host"]
    names = [host] + [f"{host}-{g['name']}" for g in d["guests"]]
    t0 = time.perf_counter()
    subprocess.run(["ip", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names), capture_output=True,
                   text=True)
    return time.perf_counter() - t0


def timed(argv) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = run(argv)
    return time.perf_counter() - t0, p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--taps", type=int, default=200)
    ap.add_argument("--guests", type=int, default=100)
    ap.add_argument("--out", default=str(HERE / "results" / "setup.md"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (namespaces)")
    res: dict[str, list[float]] = {k: [] for k in ("kvmnet_up", "kvmnet_up_again", "kvmnet_down", "ip_up", "ip_down")}
    tmp = Path(f"/tmp/kvmnet-bench-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    try:
        for r in range(a.rounds):
            tag = f"kb{secrets.token_hex(2)}{r}"
            d = lab(tag, a.taps, a.guests)
            f = tmp / f"{tag}.yaml"
            f.write_text(yaml.safe_dump(d))
            # Alternate which goes first, so neither always meets a warm (or cold) kernel.
            order = ("kvmnet", "ip") if r % 2 == 0 else ("ip", "kvmnet")
            for who in order:
                if who == "kvmnet":
                    t, _ = timed([*SETUP, "up", "-c", str(f)])
                    check(d, a.taps, a.guests)
                    t2, p = timed([*SETUP, "up", "-c", str(f), "--json"])
                    assert json.loads(p.stdout)["changed"] == 0
                    t3, _ = timed([*SETUP, "down", "-c", str(f)])
                    time.sleep(SETTLE)
                    res["kvmnet_up"].append(t)
                    res["kvmnet_up_again"].append(t2)
                    res["kvmnet_down"].append(t3)
                else:
                    di = lab(tag + "i", a.taps, a.guests)
                    try:
                        res["ip_up"].append(ip_batch(di))
                        check(di, a.taps, a.guests)
                    finally:
                        res["ip_down"].append(ip_cleanup(di))
                        time.sleep(SETTLE)
            print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:.3f}s" for k, v in res.items()), file=sys.stderr)
    finally:
        for f in tmp.glob("*.yaml"):
            subprocess.run([*SETUP, "down", "-c", str(f)], capture_output=True)
            f.unlink()
        tmp.rmdir()
    med = {k: statistics.median(v) for k, v in res.items()}
    ratio = med["kvmnet_up"] / med["ip_up"]
    paired = [k / i for k, i in zip(res["kvmnet_up"], res["ip_up"])]
    load = os.getloadavg()[0]
    py = subprocess.run([*SETUP, "--help"], capture_output=True)  # warm: start-up cost alone, for the reader
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import kvmnet.setup.apply, kvmnet.common.lab"], capture_output=True)
    startup = time.perf_counter() - t0
    del py
    text = f"""# kvmnet-setup vs `ip -batch`

Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on this machine ({os.cpu_count()} cores), kernel
{os.uname().release}; {a.rounds} rounds, alternating which goes first, {SETTLE:.0f} s pause after every
teardown (namespace cleanup runs in the background in the kernel); medians.

Topology: one host namespace with br0 and {a.taps} taps on it, plus {a.guests} light guests (a namespace each, a veth
whose host end is on br0, address + MAC + up on the guest end). Both results are checked with `ip -j`/`bridge -j`.

| | median | all rounds |
|---|---|---|
| `kvmnet-setup up` (whole CLI, Python start-up included) | {med['kvmnet_up']:.3f} s | {', '.join(f'{x:.3f}' for x in res['kvmnet_up'])} |
| `ip -batch` (1 + 1 + {a.guests} processes) | {med['ip_up']:.3f} s | {', '.join(f'{x:.3f}' for x in res['ip_up'])} |
| **ratio kvmnet / ip** (of the medians) | **{ratio:.2f}x** (goal <= 2x) | per round: {', '.join(f'{x:.2f}' for x in paired)} |
| `kvmnet-setup up` again (observes, plans nothing) | {med['kvmnet_up_again']:.3f} s | |
| `kvmnet-setup down` | {med['kvmnet_down']:.3f} s | |
| `ip -batch` netns del (returns before the kernel's cleanup) | {med['ip_down']:.3f} s | |
| Python start-up + imports alone | {startup:.3f} s | |

Load average when done: {load:.1f} (other sessions share this 2-core machine: single rounds can be off by
several times for either side, which is why the medians and the per-round ratios are both shown).

How kvmnet gets there: one netlink socket per namespace for the whole run; namespaces made in-process (unshare +
bind mount, as `ip netns add`) instead of forking; taps made with TUNSETIFF directly (pyroute2 forks a helper per
tap inside a namespace); a light guest's veth is created from inside its namespace so the guest end is configured
with the socket already held.
"""
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
