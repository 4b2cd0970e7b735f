"""Bridges and their ports: counters, carrier, STP state, FDB sizes and the tap -> guest mapping.

Two collectors over one shared `NetlinkSource` per namespace, so operators can drop the FDB part
(`--no-collector.fdb`): without it the source never subscribes to or dumps the FDB.

`bridge` (BridgeCollector):

    # HELP kvmnet_port_transmit_bytes_total Bytes the host sent out of this bridge port. Host's view: a tap's transmit is its guest's receive.
    # TYPE kvmnet_port_transmit_bytes_total counter
    kvmnet_port_transmit_bytes_total{netns="lab",bridge="br0",device="vm1eth0"} 123456
    kvmnet_port_up{netns="lab",bridge="br0",device="vm1eth0"} 1
    kvmnet_port_stp_state{netns="lab",bridge="br0",device="vm1eth0",state="forwarding"} 1
    kvmnet_port_info{netns="lab",bridge="br0",device="vm1eth0",kind="tap",mac="fe:..",guest="vm1"} 1
    kvmnet_bridge_ports{netns="lab",bridge="br0"} 2
    kvmnet_bridge_info{netns="lab",bridge="br0",mac="..",stp="true"} 1

`fdb` (FdbCollector):

    kvmnet_port_fdb_entries{netns="lab",bridge="br0",device="vm1eth0",type="learned"} 1
    kvmnet_bridge_fdb_entries{netns="lab",bridge="br0",type="local"} 3

Samples come sorted by bridge, then device (the snapshot's order), so output is stable. `include`/`exclude`
(`--device.include/exclude`) are searched (re.search) in bridge port names only; bridges are always reported, and
kvmnet_bridge_ports and kvmnet_bridge_fdb_entries always count every port.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Iterable

from ..exposition import MetricFamily, labels, with_label
from . import internals
from ..sources.netlink import FDB_TYPES, STP_STATES, BridgeSnapshot, Counters, NetlinkSource, source_for

FIELDS = Counters._fields

log = logging.getLogger("kvmnet.collectors.bridges")

_HOST_VIEW = "Host's view: a tap's transmit is its guest's receive."
# (field of Counters, direction, unit): the order of the families in the output.
_COUNTERS = (
    ("rx_bytes", "receive", "bytes"), ("rx_packets", "receive", "packets"),
    ("rx_errors", "receive", "errors"), ("rx_dropped", "receive", "dropped"),
    ("tx_bytes", "transmit", "bytes"), ("tx_packets", "transmit", "packets"),
    ("tx_errors", "transmit", "errors"), ("tx_dropped", "transmit", "dropped"),
)
_WHAT = {"bytes": "Bytes", "packets": "Packets", "errors": "Errors", "dropped": "Packets dropped"}


def _counter_help(scope: str, direction: str, unit: str) -> str:
    verb = "received by the host on" if direction == "receive" else "the host sent out of"
    if direction == "receive" and unit == "errors":
        verb = "on frames received by the host on"
    elif unit == "errors":
        verb = "on frames the host sent out of"
    if scope == "port":
        return f"{_WHAT[unit]} {verb} this bridge port. {_HOST_VIEW}"
    return (f"{_WHAT[unit]} {verb} the bridge device itself (frames to and from the host's own stack on the "
            f"bridge, not the traffic it forwards between ports).")


def _filter(include: re.Pattern | None, exclude: re.Pattern | None) -> Callable[[str], bool]:
    def keep(name: str) -> bool:
        if include is not None and not include.search(name):
            return False
        return exclude is None or not exclude.search(name)
    return keep


class _Rows:
    """Rendered line prefixes per port and bridge, kept across scrapes: a scrape of 1000 taps is ~19k samples, and
    building each line from labels costs ~16 ms where `prefix + str(value)` costs ~4 ms (~2.5 kB per port).
    Rows of devices not seen in a scrape are dropped, so the cache follows the topology."""

    def __init__(self) -> None:
        self.ports: dict[tuple, tuple] = {}
        self.bridges: dict[tuple, tuple] = {}

    def port(self, key: tuple) -> tuple:
        """key: (netns, bridge, device, kind, mac, guest)."""
        row = self.ports.get(key)
        if row is None:
            ns, bridge, device, kind, mac, guest = key
            # Only the base label set goes through the (process-wide, LRU) label cache; the variants are built
            # here and live in this row, so memory stays one row per port.
            pl = labels(netns=ns, bridge=bridge, device=device)
            counters = tuple(f"kvmnet_port_{d}_{u}_total{pl} " for _f, d, u in _COUNTERS)
            stp = tuple(f"kvmnet_port_stp_state{with_label(pl, 'state', s)} " for s in STP_STATES)
            il = with_label(with_label(with_label(pl, "kind", kind), "mac", mac), "guest", guest)
            row = self.ports[key] = (counters, f"kvmnet_port_up{pl} ", f"kvmnet_port_carrier_changes_total{pl} ",
                                     stp, f"kvmnet_port_info{il} 1")
        return row

    def bridge(self, ns: str, br) -> tuple:
        key = (ns, br.name, br.mac, br.stp_enabled)
        row = self.bridges.get(key)
        if row is None:
            bl = labels(netns=ns, bridge=br.name)
            counters = tuple(f"kvmnet_bridge_{d}_{u}_total{bl} " for _f, d, u in _COUNTERS)
            il = labels(netns=ns, bridge=br.name, mac=br.mac, stp="true" if br.stp_enabled else "false")
            info = f"kvmnet_bridge_info{il} 1"
            row = self.bridges[key] = (counters, f"kvmnet_bridge_up{bl} ", f"kvmnet_bridge_ports{bl} ", info)
        return row

    def prune(self, seen_ports: set, seen_bridges: set) -> None:
        if len(self.ports) > len(seen_ports):
            self.ports = {k: v for k, v in self.ports.items() if k in seen_ports}
        if len(self.bridges) > len(seen_bridges):
            self.bridges = {k: v for k, v in self.bridges.items() if k in seen_bridges}


def bridge_families(snap: BridgeSnapshot, guests: dict | None = None,
                    keep: Callable[[str], bool] = lambda _n: True, rows: _Rows | None = None) -> list[MetricFamily]:
    """Render everything but FDB sizes. Pure (the golden file test feeds it recorded dumps); `rows` is the cache."""
    guests = guests or {}
    rows = rows if rows is not None else _Rows()
    ns = snap.netns
    port_c = [MetricFamily(f"kvmnet_port_{d}_{u}_total", "counter", _counter_help("port", d, u))
              for _f, d, u in _COUNTERS]
    up = MetricFamily("kvmnet_port_up", "gauge",
                      "Carrier of the bridge port (IFF_LOWER_UP, not operstate): a tap that no process holds open, "
                      "for example because its QEMU died, is 0.")
    flaps = MetricFamily("kvmnet_port_carrier_changes_total", "counter",
                         "Carrier changes of the bridge port since it was created (IFLA_CARRIER_CHANGES).")
    stp = MetricFamily("kvmnet_port_stp_state", "gauge",
                       "STP state of the bridge port as a state set: 1 for the current state, 0 for the others. "
                       "Ports of a bridge without STP forward (or are disabled while down).")
    info = MetricFamily("kvmnet_port_info", "gauge",
                        "A bridge port: its kind (tap, tun, veth, ...), its own MAC (host side) and the guest "
                        "behind it (empty when unknown).")
    br_c = [MetricFamily(f"kvmnet_bridge_{d}_{u}_total", "counter", _counter_help("bridge", d, u))
            for _f, d, u in _COUNTERS]
    br_up = MetricFamily("kvmnet_bridge_up", "gauge",
                         "Carrier of the bridge device (IFF_LOWER_UP): 1 while at least one port is up.")
    br_ports = MetricFamily("kvmnet_bridge_ports", "gauge", "Ports enslaved to the bridge.")
    br_info = MetricFamily("kvmnet_bridge_info", "gauge", "A bridge: its MAC and whether kernel STP is on.")

    # Counters in the order of _COUNTERS, as indices into the Counters tuple (kernel order).
    idx = [FIELDS.index(f) for f, _d, _u in _COUNTERS]
    pc_lines = [f.lines for f in port_c]
    bc_lines = [f.lines for f in br_c]
    up_l, flaps_l, stp_l, info_l = up.lines, flaps.lines, stp.lines, info.lines
    seen_p, seen_b = set(), set()
    for br in snap.bridges:
        counters, up_p, ports_p, binfo = rows.bridge(ns, br)  # always: the device filter is for ports
        seen_b.add((ns, br.name, br.mac, br.stp_enabled))
        st = br.stats
        for lines, prefix, i in zip(bc_lines, counters, idx):
            lines.append(prefix + str(st[i]))
        br_up.lines.append(up_p + ("1" if br.up else "0"))
        br_ports.lines.append(ports_p + str(len(br.ports)))
        br_info.lines.append(binfo)
        for p in br.ports:
            if not keep(p.name):
                continue
            g = guests.get(p.name)
            key = (ns, br.name, p.name, p.kind, p.mac, g.name if g is not None else "")
            counters, up_p, flaps_p, stp_prefixes, pinfo = rows.port(key)
            seen_p.add(key)
            st = p.stats
            for lines, prefix, i in zip(pc_lines, counters, idx):
                lines.append(prefix + str(st[i]))
            up_l.append(up_p + ("1" if p.up else "0"))
            flaps_l.append(flaps_p + str(p.carrier_changes))
            s = p.stp_state
            for i, prefix in enumerate(stp_prefixes):
                stp_l.append(prefix + ("1" if i == s else "0"))
            info_l.append(pinfo)
    rows.prune(seen_p, seen_b)
    return port_c + [up, flaps, stp, info] + br_c + [br_up, br_ports, br_info]


def fdb_families(snap: BridgeSnapshot, keep: Callable[[str], bool] = lambda _n: True,
                 cache: dict | None = None) -> list[MetricFamily]:
    """Render FDB sizes; `cache` keeps the three rendered prefixes per device across scrapes."""
    port = MetricFamily("kvmnet_port_fdb_entries", "gauge",
                        "Bridge FDB entries on this port by type: local (the port's own addresses, permanent), "
                        "static (added by an operator) and learned (dynamic).")
    bridge = MetricFamily("kvmnet_bridge_fdb_entries", "gauge",
                          "Bridge FDB entries by type (local, static, learned), all ports and the bridge itself.")
    cache = cache if cache is not None else {}
    ns = snap.netns
    seen = set()

    def prefixes(metric: str, bridge_name: str, device: str | None) -> tuple[str, ...]:
        key = (metric, ns, bridge_name, device)
        seen.add(key)
        row = cache.get(key)
        if row is None:
            base = labels(netns=ns, bridge=bridge_name) if device is None else labels(netns=ns, bridge=bridge_name,
                                                                                          device=device)
            row = tuple(f"{metric}{with_label(base, 'type', t)} " for t in FDB_TYPES)
            cache[key] = row
        return row

    for br in snap.bridges:
        if br.fdb is not None:
            pre = prefixes(bridge.name, br.name, None)
            f = br.fdb
            bridge.lines += (pre[0] + str(f.local), pre[1] + str(f.static), pre[2] + str(f.learned))
        for p in br.ports:
            if keep(p.name) and p.fdb is not None:
                pre = prefixes(port.name, br.name, p.name)
                f = p.fdb
                port.lines += (pre[0] + str(f.local), pre[1] + str(f.static), pre[2] + str(f.learned))
    if len(cache) > len(seen):
        for k in [k for k in cache if k not in seen]:
            del cache[k]
    return [port, bridge]


class BridgeCollector:
    """kvmnet_port_* (but FDB) and kvmnet_bridge_* of one namespace. `identity.lookup(netns)` names the guests."""

    name = "bridge"

    def __init__(self, netns: str, identity=None, include: re.Pattern | None = None,
                 exclude: re.Pattern | None = None, source: NetlinkSource | None = None) -> None:
        self.netns = netns
        self.identity = identity
        self.keep = _filter(include, exclude)
        self.source = source if source is not None else source_for(netns)
        self._rows = _Rows()
        self._internals = internals._Prefixes()

    def collect(self) -> Iterable[MetricFamily]:
        snap = self.source.snapshot(fdb=False)
        guests = {}
        if self.identity is not None:
            try:
                guests = self.identity.lookup(self.netns) or {}
            except Exception as exc:  # noqa: BLE001 - unknown guests are "", the counters are still served
                log.warning("event=identity_failed netns=%s error=%r", self.netns, str(exc))
        resyncs = MetricFamily("kvmnet_netlink_resyncs_total", "counter",
                               "Full netlink dumps of a namespace (start, event overflow, periodic). Between them "
                               "topology and FDB are kept current from netlink events.")
        resyncs.add(labels(netns=self.netns), self.source.resyncs)
        out = bridge_families(snap, guests, self.keep, self._rows)
        out += internals.port_families(snap, self.keep, self._internals) + internals.bridge_stp_families(snap)
        out.append(internals.mac_conflict_family(snap, guests))
        self._internals.prune()
        return out + [resyncs]

    def close(self) -> None:
        """Drop the namespace's sockets (shared with the fdb collector and the prober: they reopen on next use).
        Call it when the namespace is gone, so dead namespaces are not kept alive by our sockets."""
        self.source.close()


class FdbCollector:
    """kvmnet_port_fdb_entries and kvmnet_bridge_fdb_entries of one namespace."""

    name = "fdb"

    def __init__(self, netns: str, include: re.Pattern | None = None, exclude: re.Pattern | None = None,
                 source: NetlinkSource | None = None) -> None:
        self.netns = netns
        self.keep = _filter(include, exclude)
        self.source = source if source is not None else source_for(netns)
        self._cache: dict = {}
        self._internals = internals._Prefixes()

    def collect(self) -> Iterable[MetricFamily]:
        snap = self.source.snapshot(stats=False)
        out = fdb_families(snap, self.keep, self._cache) + internals.fdb_internal_families(snap, self.keep,
                                                                                            self._internals)
        self._internals.prune()
        return out

    def close(self) -> None:
        self.source.close()
