"""Record real rtnetlink dumps and events into tests/unit/data/*.bin for the pure parse tests.

    sudo .venv/bin/python tests/unit/record_netlink.py          # rewrites tests/unit/data/*.bin
    KVMNET_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_netlink_parse.py   # then the golden file

It builds a throwaway namespace (removed afterwards) whose contents are deterministic: fixed MACs, no IPv6, STP off
on br0 and on (but idle) on br1, an FDB learning limit of 64 on br0, a tbf root qdisc on ve0, and known traffic: three 100-byte broadcast frames written into tap vm0 (the
bridge floods them: rx on vm0, tx_dropped on the taps nobody holds, rx on br0), so every counter field has a
distinct value. events.bin includes a learned MAC moving from vm8 to vm9. Each file is the receive buffers of one request, back to back (netlink messages are
self-delimiting and 4-byte aligned). events.bin holds the notifications of a scripted change sequence.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from kvmnet.common import netns  # noqa: E402
from kvmnet.exporter.sources import netlink as nl  # noqa: E402

DATA = HERE / "data"
ODD = ['vm"2\\é', "x.y-z_0"]  # a quote, a backslash and UTF-8 are all legal in device names
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True)


def bridge(ns: str, *args: str) -> None:
    subprocess.run(["bridge", "-n", ns, *args], check=True)


def dump(sock: socket.socket, typ: int, body: bytes) -> bytes:
    sock.send(nl._request(typ, 1, body))
    out = []
    while True:
        data = sock.recv(nl.RECV_SIZE)
        out.append(data)
        if any(t in (nl.NLMSG_DONE, nl.NLMSG_ERROR) for t, *_ in nl.iter_messages(data)):
            return b"".join(out)


def build(ns: str) -> int:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1"], check=True)
    ip(ns, "link", "set", "lo", "up")
    ip(ns, "link", "add", "br0", "address", "02:42:00:00:00:01", "type", "bridge", "stp_state", "0")
    ip(ns, "link", "add", "br1", "address", "02:42:00:00:00:02", "type", "bridge", "stp_state", "1")
    for i, tap in enumerate(["vm0", "vm1", *ODD]):
        ip(ns, "tuntap", "add", "dev", tap, "mode", "tap")
        ip(ns, "link", "set", tap, "address", f"0a:00:00:00:00:{i + 1:02x}", "master", "br0", "up")
    ip(ns, "tuntap", "add", "dev", "tun0", "mode", "tun")
    ip(ns, "link", "add", "ve0", "address", "0a:00:00:00:01:01", "type", "veth", "peer", "name", "ve0p",
       "address", "0a:00:00:00:01:02")
    ip(ns, "link", "set", "ve0", "master", "br1", "up")
    ip(ns, "link", "set", "ve0p", "up")
    ip(ns, "link", "set", "br0", "up")
    ip(ns, "link", "set", "br1", "up")
    from kvmnet.common.rtnl import Rtnl
    r = Rtnl(ns)
    r.bridge_fdb_max_learned(r.links()["br0"][0], 64)
    r.close()
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "ve0", "root", "tbf", "rate", "1mbit", "burst", "1600",
                    "limit", "3000"], check=True)
    for i in range(3):
        bridge(ns, "fdb", "add", f"02:00:00:00:01:0{i}", "dev", "vm1", "master", "static")
    bridge(ns, "fdb", "add", "02:00:00:00:02:01", "dev", "vm0", "master", "permanent")
    bridge(ns, "fdb", "add", "02:00:00:00:03:01", "dev", "br0", "self", "permanent")
    # (This kernel has no CONFIG_BRIDGE_VLAN_FILTERING: no per-VLAN entries to record.)
    bridge(ns, "fdb", "add", "02:00:00:00:04:01", "dev", ODD[0], "master", "static")
    ip(ns, "neigh", "add", "10.0.0.9", "lladdr", "0a:00:00:00:09:09", "dev", "br0", "nud", "permanent")
    ip(ns, "addr", "add", "10.0.0.1/24", "dev", "br0")
    with netns.entered(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"vm0", IFF_TAP | IFF_NO_PI))
    frame = bytes.fromhex("ffffffffffff" "0a0000000005" "88b5") + bytes(86)  # 100 bytes, local experimental type
    time.sleep(1.5)  # carrier up, settled
    for _ in range(3):
        os.write(fd, frame)
    time.sleep(0.5)
    return fd


def main() -> None:
    ns = f"kn-rec{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        fd = build(ns)
        s = netns.socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_ROUTE)
        s.bind((0, 0))
        DATA.mkdir(exist_ok=True)
        (DATA / "links.bin").write_bytes(dump(s, nl.RTM_GETLINK, nl._LINK_REQ))
        (DATA / "stats.bin").write_bytes(dump(s, nl.RTM_GETSTATS, nl._STATS_REQ))
        (DATA / "bridges.bin").write_bytes(dump(s, nl.RTM_GETLINK, nl._BRIDGES_REQ))
        (DATA / "qdisc.bin").write_bytes(dump(s, nl.RTM_GETQDISC, nl._QDISC_REQ))
        (DATA / "fdb.bin").write_bytes(dump(s, nl.RTM_GETNEIGH, nl._FDB_REQ))
        (DATA / "neigh.bin").write_bytes(dump(s, nl.RTM_GETNEIGH, nl._NEIGH_REQ))
        os.close(fd)

        ev = netns.socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_ROUTE)
        ev.bind((0, (1 << (nl.RTNLGRP_LINK - 1)) | (1 << (nl.RTNLGRP_NEIGH - 1))))
        time.sleep(1.5)  # vm0's carrier loss (closed above) arrives first
        # The scripted changes: a new tap joins br0 with a static entry; vm1's static entry goes; vm1 is deleted.
        ip(ns, "tuntap", "add", "dev", "vm9", "mode", "tap")
        ip(ns, "link", "set", "vm9", "address", "0a:00:00:00:00:09", "master", "br0", "up")
        ip(ns, "tuntap", "add", "dev", "vm8", "mode", "tap")
        ip(ns, "link", "set", "vm8", "address", "0a:00:00:00:00:08", "master", "br0", "up")
        fds = []
        with netns.entered(ns):
            for tap in (b"vm8", b"vm9"):
                fds.append(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
                fcntl.ioctl(fds[-1], TUNSETIFF, struct.pack("16sH", tap, IFF_TAP | IFF_NO_PI))
        time.sleep(1.5)  # carrier
        # One source MAC heard on vm8, then on vm9: one move onto vm9. (A port losing carrier flushes its learned
        # entries, so a MAC from a closed tap would be learned anew, not moved.)
        for fd in fds:
            os.write(fd, bytes.fromhex("ffffffffffff" "0a0000000077" "88b5") + bytes(86))
            time.sleep(0.2)
        bridge(ns, "fdb", "add", "02:00:00:00:09:01", "dev", "vm9", "master", "static")
        bridge(ns, "fdb", "del", "02:00:00:00:01:00", "dev", "vm1", "master")
        ip(ns, "link", "del", "vm1")
        time.sleep(0.5)
        ev.setblocking(False)
        chunks = []
        while True:
            try:
                chunks.append(ev.recv(nl.RECV_SIZE))
            except BlockingIOError:
                break
        (DATA / "events.bin").write_bytes(b"".join(chunks))
        for fd in fds:  # only now: a carrier loss would flush vm9's learned entry
            os.close(fd)
        for f in sorted(DATA.glob("*.bin")):
            print(f"{f.relative_to(HERE.parents[1])}: {f.stat().st_size} bytes")
    finally:
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    main()
