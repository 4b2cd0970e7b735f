"""What to ping: the one `Target` type (config, lab file and discovery all become it), and discovery.

Discovery (no configuration): in each watched namespace, for each tap port of a bridge (and each port the identity
source names) and each macvtap, the guest's MAC (known from its identity, or learned on its tap) joined with the
neighbour table (or libvirt's DHCP leases) gives the guest's address. It is passive: a guest is found once the host
has a neighbour entry for it, i.e. after it exchanged traffic with the host (ARP for its gateway, DHCP, any
connection), or once libvirt's dnsmasq leased it an address. Nothing scans the subnet. Once found,
the probes themselves keep the FDB and neighbour entries fresh. A discovered guest that disappears (its QEMU
died and took the tap away) is kept for `FORGET_AFTER` seconds so it is reported down rather than silently gone.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger("kvmnet.guests")

DISCOVER_EVERY = 5.0    # seconds between discovery passes
LINK_CHECK_EVERY = 1.0  # seconds between looks at the link events: a pass at once when a device changed
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
    def of(cls, obj: Any) -> Target:
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
    """Guests behind the bridge ports and macvtaps of one namespace (see `discover`)."""
    return discover(netns, directory, source)[0]


def discover(netns: str, directory: Any = None, source: Any = None) -> tuple[list[Target], set[str]]:
    """(guests found, every device name in the namespace now). A guest's MAC: the one its identity gives (QEMU,
    libvirt, lab), else those learned on its tap; for a macvtap, the device's own (libvirt gives it the guest's).
    Its address: a neighbour entry for that MAC on the port's own bridge, or on a bridge joined to it by a veth
    pair (Proxmox's firewall: the tap is on fwbrNiM, fwlnNiM <-> fwprNpM joins it to vmbr0, where the host's
    entry is); for a macvtap, on its lower device or a macvlan sibling on it (how a host reaches its macvtap
    guests); else libvirt's DHCP lease on that bridge."""
    if source is None:  # no owner handed one in: a source of our own for this one pass
        from ..sources.netlink import NetlinkSource
        own = NetlinkSource(netns)
        try:
            return discover(netns, directory, own)
        finally:
            own.close()
    idents: dict = {}
    leases: dict = {}
    if directory is not None:
        try:
            idents = directory.lookup(netns) or {}
            leases = directory.leases(netns) if hasattr(directory, "leases") else {}
        except Exception as exc:  # noqa: BLE001 - names are a nicety; discovery goes on with tap names
            log.debug("event=identity_failed netns=%s error=%r", netns, str(exc))
    snap = source.snapshot(stats=False, fdb=False)
    learned = source.learned_macs_by_port()
    neigh: dict[str, list[tuple[str, Any]]] = {}
    for n in source.neighbours():
        if n.address.version == 6 and n.address.is_link_local:
            continue  # a link-local address needs an interface scope the prober's namespace cannot name
        neigh.setdefault(n.mac, []).append((n.device, n.address))

    pairs = getattr(snap, "links", {}) or {}
    port_bridge = {p.name: br.name for br in snap.bridges for p in br.ports}

    def joined(bridge: str) -> list[str]:
        """The bridge, then the bridges reachable from it through veth pairs (breadth first, each once)."""
        order, i = [bridge], 0
        while i < len(order) and len(order) < 16:
            b = next((x for x in snap.bridges if x.name == order[i]), None)
            for p in b.ports if b is not None else ():
                far = port_bridge.get(pairs.get(p.name, ""))
                if far and far not in order:
                    order.append(far)
            i += 1
        return order

    def address_of(mac: str, bridge: str, devices: list[str] | None = None):
        entries = neigh.get(mac, [])
        addrs = []
        for dev in devices if devices is not None else joined(bridge):
            addrs = [a for d, a in entries if d == dev]
            if addrs:
                break
        if not addrs and (bridge, mac) in leases:
            addrs = [leases[(bridge, mac)]]
        return min(addrs, key=lambda a: (a.version, a)) if addrs else None

    out = []
    devices = {p.name for br in snap.bridges for p in br.ports} | {br.name for br in snap.bridges}
    for br in snap.bridges:
        for port in br.ports:
            ident = idents.get(port.name)
            if ident is not None and getattr(ident, "source", "") == "firewall":
                continue  # a Proxmox firewall port carries every guest's frames, not its guest's
            if port.kind not in TAP_KINDS and ident is None:
                continue  # uplinks and plain veths: their far side is a LAN, not a guest
            macs = learned.get(port.name, [])
            if ident is not None and ident.mac:
                # Known MAC first, even if not learned (yet, or any more: a quiet guest's FDB entry ages out).
                macs = [ident.mac] + [m for m in macs if m != ident.mac]
            for mac in macs:
                addr = address_of(mac, br.name)
                if addr is not None:
                    name = ident.name if ident is not None and ident.name else port.name
                    out.append(Target(name, addr, netns, mac, br.name, port.name, "discovery"))
                    break  # one target per port: its first MAC with an address, IPv4 first
    for port in getattr(snap, "macvtaps", []):
        devices.add(port.name)
        ident = idents.get(port.name)
        mac = ident.mac if ident is not None and ident.mac else port.mac
        siblings = [port.lower] + sorted(d for d, low in pairs.items() if low == port.lower and d != port.name)
        addr = address_of(mac, port.lower, siblings)
        if addr is not None:
            name = ident.name if ident is not None and ident.name else port.name
            out.append(Target(name, addr, netns, mac, "", port.name, "discovery"))
    return out, devices


class Discovery:
    """Periodic discovery over the watched namespaces, with a grace period for guests that disappear.

    Found guests are keyed by their device, so a guest renamed when its identity arrives (found under its tap's
    name before its QEMU was scanned) replaces its old entry at once: no leftover series. A guest whose device is
    gone is kept for FORGET_AFTER seconds, reported down, with device="" and bridge="" (kvmnet_guest_info names no
    deleted tap); it is dropped at once when it is found again, on another device or under that name."""

    def __init__(self, source_for: Callable[[str], Any] | None = None) -> None:
        self.source_for = source_for  # netns -> the owner's NetlinkSource; None: discover_netns opens its own
        self.seen: dict[tuple[str, ...], tuple[Target, float]] = {}
        self.failed: dict[str, str] = {}

    def run_once(self, namespaces: list[str], directory: Any = None) -> list[Target]:
        now = time.monotonic()
        fresh: set[tuple[str, str]] = set()
        present: dict[str, set[str]] = {}
        for ns in namespaces:
            try:
                found, devices = discover(ns, directory, self.source_for(ns) if self.source_for else None)
            except Exception as exc:  # noqa: BLE001 - a namespace gone or unreadable: keep what we had
                if self.failed.get(ns) != str(exc):
                    self.failed[ns] = str(exc)
                    log.warning("event=discovery_failed netns=%s error=%r", ns or "-", str(exc))
                continue
            if ns in self.failed:
                del self.failed[ns]
            present[ns] = devices
            for t in found:
                key = (ns, t.device)
                old = self.seen.get(key)
                if old is None or old[0].name != t.name:
                    log.info("event=guest_discovered netns=%s guest=%s address=%s device=%s%s",
                             ns or "-", t.name, t.address, t.device,
                             f" renamed_from={old[0].name}" if old is not None else "")
                self.seen[key] = (t, now)
                fresh.add(t.key)
        for key, (t, at) in list(self.seen.items()):
            if at == now:
                continue
            if t.key in fresh:
                del self.seen[key]  # found again elsewhere (a new tap after a restart): that one counts
            elif now - at > FORGET_AFTER or t.netns not in namespaces:
                log.info("event=guest_forgotten netns=%s guest=%s", t.netns or "-", t.name)
                del self.seen[key]
            elif t.device and t.netns in present and t.device not in present[t.netns]:
                # Its device is gone (QEMU died, domain destroyed): keep reporting it down, pointing at nothing.
                del self.seen[key]
                self.seen[(t.netns, "", t.name)] = (replace(t, device="", bridge=""), at)
        return [t for t, _ in self.seen.values()]
