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
