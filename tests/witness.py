"""The independent witness: what iproute2 says about the kernel. MUST NOT import anything from kvmnet."""
from __future__ import annotations

import json
import subprocess


def _json(*argv: str) -> list:
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def links(netns: str) -> dict[str, dict]:
    """`ip -s -s -j link` by device name (stats64, flags, master, linkinfo)."""
    return {l["ifname"]: l for l in _json("ip", "-n", netns, "-s", "-s", "-d", "-j", "link", "show")}


def fdb(netns: str) -> list[dict]:
    """`bridge -j fdb show` entries."""
    return _json("bridge", "-n", netns, "-j", "fdb", "show")


def bridge_ports(netns: str) -> dict[str, dict]:
    """`bridge -j link` by port name (master, state)."""
    return {p["ifname"]: p for p in _json("bridge", "-n", netns, "-j", "link", "show")}


def stp_xstats(netns: str) -> dict[str, dict]:
    """`ip -j stats show group xstats_slave subgroup bridge suite stp`: {port: {rx_bpdu, ..., transition_fwd}}."""
    out = _json("ip", "-n", netns, "-j", "stats", "show", "group", "xstats_slave", "subgroup", "bridge", "suite", "stp")
    return {e["ifname"]: e["stp"] for e in out if "stp" in e}


def root_qdiscs(netns: str) -> dict[str, dict]:
    """`tc -s -j qdisc show`: each device's root qdisc with its counters."""
    return {q["dev"]: q for q in _json("tc", "-n", netns, "-s", "-j", "qdisc", "show") if q.get("root")}


def sysfs_bridge(netns: str, bridge: str, attr: str) -> str:
    """/sys/class/net/BRIDGE/bridge/ATTR read inside the namespace (the kernel's own text). Used for root_id:
    iproute2 6.1's `ip -d link` prints the bridge's own id as root_id (it reads IFLA_BR_BRIDGE_ID for both)."""
    return run(netns, "cat", f"/sys/class/net/{bridge}/bridge/{attr}").stdout.strip()


def run(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=check, capture_output=True, text=True)


def links_raw(netns: str) -> dict[str, dict]:
    """`ip -s -s -j link` for odd names: iproute2 writes device names as their raw bytes (not UTF-8, control
    characters unescaped), so read bytes, decode with surrogateescape and parse leniently."""
    out = subprocess.run(["ip", "-n", netns, "-s", "-s", "-j", "link", "show"], check=True,
                         capture_output=True).stdout
    return {l["ifname"]: l for l in json.loads(out.decode("utf-8", "surrogateescape"), strict=False)}


def expected_label(raw: bytes) -> str:
    """The documented mapping, written out independently of exporter/exposition.py."""
    out = []
    s = raw.decode("utf-8", "surrogateescape")
    for ch in s:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif o < 0x20 or o == 0x7f:
            out.append(f"\\x{o:02x}")
        elif 0xdc80 <= o <= 0xdcff:
            out.append(f"\\x{o - 0xdc00:02x}")
        else:
            out.append(ch)
    return "".join(out)
