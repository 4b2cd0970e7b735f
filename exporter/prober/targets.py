"""What to ping: the one `Target` type (config, lab file and discovery all become it), and discovery.

Discovery (no configuration): in each watched namespace, for each tap port of a bridge (and each port the identity
source names), the MACs learned on it (dynamic FDB entries) joined with the neighbour table of that bridge give
the guest's address. It is passive: a guest is found once the host has a neighbour entry for it, i.e. after it
exchanged traffic with the host (ARP for its gateway, DHCP, any connection). Nothing scans the subnet. Once found,
the probes themselves keep the FDB and neighbour entries fresh. A discovered guest that disappears (its QEMU
died and took the tap away) is kept for `FORGET_AFTER` seconds so it is reported down rather than silently gone.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("kvmnet.guests")

DISCOVER_EVERY = 5.0    # seconds between discovery passes
FORGET_AFTER = 300.0    # a discovered guest no longer seen is dropped after this long
TAP_KINDS = ("tap", "tun")


@dataclass(frozen=True)
class Target:
    """A guest to ping: `name` is the guest label, `netns` where to ping it from ("" = the exporter's own)."""
    name: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    netns: str = ""
    mac: str = ""
    bridge: str = ""
    device: str = ""
    source: str = "config"  # config | lab | discovery

    @classmethod
    def of(cls, obj: Any) -> "Target":
        """From any object with name/address/netns (the config file's target entry, a lab Guest)."""
        if isinstance(obj, Target):
            return obj
        addr = obj.address
        addr = getattr(addr, "ip", addr)  # an IPv4Interface from a lab file
        return cls(str(obj.name), ipaddress.ip_address(addr), getattr(obj, "netns", None) or "",
                   getattr(obj, "mac", "") or "", getattr(obj, "bridge", "") or "", getattr(obj, "device", "") or "",
                   getattr(obj, "source", "config") or "config")

    @property
    def key(self) -> tuple[str, str]:
        return (self.netns, self.name)


def discover_netns(netns: str, directory: Any = None, source: Any = None) -> list[Target]:
    """Guests behind the bridge ports of one namespace: learned MACs joined with the bridge's neighbours."""
    if source is None:  # no owner handed one in: a source of our own for this one pass
        from ..sources.netlink import NetlinkSource
        own = NetlinkSource(netns)
        try:
            return discover_netns(netns, directory, own)
        finally:
            own.close()
    idents = {}
    if directory is not None:
        try:
            idents = directory.lookup(netns) or {}
        except Exception as exc:  # noqa: BLE001 - names are a nicety; discovery goes on with tap names
            log.debug("event=identity_failed netns=%s error=%r", netns, str(exc))
    snap = source.snapshot(stats=False, fdb=False)
    learned = source.learned_macs_by_port()
    neigh: dict[tuple[str, str], list] = {}
    for n in source.neighbours():
        if n.address.version == 6 and n.address.is_link_local:
            continue  # a link-local address needs an interface scope the prober's namespace cannot name
        neigh.setdefault((n.device, n.mac), []).append(n.address)
    out = []
    for br in snap.bridges:
        for port in br.ports:
            ident = idents.get(port.name)
            if port.kind not in TAP_KINDS and ident is None:
                continue  # uplinks and plain veths: their far side is a LAN, not a guest
            macs = learned.get(port.name, [])
            if ident is not None and getattr(ident, "mac", ""):
                macs = [m for m in macs if m == ident.mac] or macs
            for mac in macs:
                addrs = sorted(neigh.get((br.name, mac), []), key=lambda a: (a.version, a))
                if addrs:
                    name = ident.name if ident is not None else port.name
                    out.append(Target(name, addrs[0], netns, mac, br.name, port.name, "discovery"))
                    break  # one target per port: its first MAC with an address, IPv4 first
    return out


class Discovery:
    """Periodic discovery over the watched namespaces, with a grace period for guests that disappear."""

    def __init__(self, source_for: Callable[[str], Any] | None = None) -> None:
        self.source_for = source_for  # netns -> the owner's NetlinkSource; None: discover_netns opens its own
        self.seen: dict[tuple[str, str], tuple[Target, float]] = {}
        self.failed: dict[str, str] = {}

    def run_once(self, namespaces: list[str], directory: Any = None) -> list[Target]:
        now = time.monotonic()
        for ns in namespaces:
            try:
                found = (discover_netns(ns, directory) if self.source_for is None
                         else discover_netns(ns, directory, self.source_for(ns)))
            except Exception as exc:  # noqa: BLE001 - a namespace gone or unreadable: keep what we had
                if self.failed.get(ns) != str(exc):
                    self.failed[ns] = str(exc)
                    log.warning("event=discovery_failed netns=%s error=%r", ns or "-", str(exc))
                continue
            if ns in self.failed:
                del self.failed[ns]
            for t in found:
                old = self.seen.get(t.key)
                if old is None:
                    log.info("event=guest_discovered netns=%s guest=%s address=%s device=%s",
                             ns or "-", t.name, t.address, t.device)
                self.seen[t.key] = (t, now)
        for key, (t, at) in list(self.seen.items()):
            if now - at > FORGET_AFTER or t.netns not in namespaces:
                log.info("event=guest_forgotten netns=%s guest=%s", t.netns or "-", t.name)
                del self.seen[key]
        return [t for t, _ in self.seen.values()]
