"""QEMU's script= and downscript=: the seed's /data/vm/ifup and /data/vm/ifdown, done with netlink.

    ifup:   ifconfig $1 0.0.0.0 up;   brctl addif br0 $1
    ifdown: ifconfig $1 0.0.0.0 down; brctl delif br0 $1

QEMU runs them with only the tap's name, in its own network namespace. The bridge is, in order: $KVMNET_BRIDGE;
the tap's entry in /run/kvmnet/*/taps.json, written by `kvmnet-setup up` (several labs may reuse a tap name in
different namespaces: the entry whose namespace is ours wins); br0, as in the seed.
Exit status is what QEMU looks at: non-zero makes it refuse to start the guest (ifup) and is logged (ifdown).
"""
from __future__ import annotations

import errno
import os
import sys

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kvmnet.common import netns as nsmod

from .state import find_tap


def bridge_for(tap: str) -> str:
    if os.environ.get("KVMNET_BRIDGE"):
        return os.environ["KVMNET_BRIDGE"]
    entry = find_tap(tap, nsmod.inode_at("/proc/self/ns/net"))
    return entry["bridge"] if entry else "br0"


def _addr_flush(ipr: IPRoute, index: int) -> None:
    # The seed's `ifconfig $1 0.0.0.0`: a bridge port carries no IPv4 address.
    for a in ipr.get_addr(family=2, index=index):
        ipr.addr("del", index=index, address=a.get_attr("IFA_ADDRESS"), prefixlen=a["prefixlen"])


def ifup(tap: str) -> None:
    bridge = bridge_for(tap)
    with IPRoute() as ipr:
        idx = ipr.link("get", ifname=tap)[0]["index"]
        try:
            br = ipr.link("get", ifname=bridge)[0]["index"]
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                raise LookupError(f"no bridge {bridge!r} for {tap} in this namespace") from None
            raise
        _addr_flush(ipr, idx)
        ipr.link("set", index=idx, master=br, state="up")


def ifdown(tap: str) -> None:
    with IPRoute() as ipr:
        try:
            idx = ipr.link("get", ifname=tap)[0]["index"]
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return  # already gone: nothing to detach
            raise
        _addr_flush(ipr, idx)
        ipr.link("set", index=idx, state="down")
        ipr.link("set", index=idx, master=0)


def _main(fn, name: str) -> None:
    if len(sys.argv) < 2 or not sys.argv[1]:
        print(f"usage: {name} TAP   (QEMU's {'script' if fn is ifup else 'downscript'}=)", file=sys.stderr)
        sys.exit(2)
    tap = sys.argv[1]
    try:
        fn(tap)
    except (NetlinkError, OSError, LookupError) as e:
        msg = os.strerror(e.code) if isinstance(e, NetlinkError) else str(e)
        print(f"{name}: {tap}: {msg}", file=sys.stderr)
        sys.exit(1)


def ifup_main() -> None:
    _main(ifup, "kvmnet-ifup")


def ifdown_main() -> None:
    _main(ifdown, "kvmnet-ifdown")
