"""--collector.fdb: bridge FDB sizes by type, per port and per bridge; the learning limit and MAC moves
.

    kvmnet_port_fdb_entries{netns="lab",bridge="br0",device="vm1eth0",type="learned"} 1
    kvmnet_bridge_fdb_entries{netns="lab",bridge="br0",type="local"} 3
    kvmnet_bridge_fdb_learned_limit{netns="lab",bridge="br0"} 0
    kvmnet_port_fdb_moves_total{netns="lab",bridge="br0",device="vm1eth0"} 0

Read from the namespace's `NetlinkSource` that collectors/bridge.py uses too; kvmnet_bridge_fdb_entries counts
every port whatever `--device.include/exclude` say.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from ..exposition import MetricFamily, labels, with_label
from ..sources.netlink import FDB_TYPES, BridgeSnapshot, NetlinkSource
from .bridge import _filter, _Prefixes


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


def fdb_internal_families(snap: BridgeSnapshot, keep: Callable[[str], bool], cache: _Prefixes) -> list[MetricFamily]:
    """The learning limit, the kernel's learned count and the moves of learned MACs onto each port."""
    limit = MetricFamily("kvmnet_bridge_fdb_learned_limit", "gauge",
                         "Most learned FDB entries the bridge keeps (IFLA_BR_FDB_MAX_LEARNED, kernel 6.8+); 0 means "
                         "no limit. At the limit the kernel silently stops learning new MACs, which then flood.")
    learned = MetricFamily("kvmnet_bridge_fdb_learned_entries", "gauge",
                           "Learned FDB entries as the kernel counts them against the limit (IFLA_BR_FDB_N_LEARNED, "
                           "kernel 6.8+; entries added by hand or by a driver do not count).")
    moves = MetricFamily("kvmnet_port_fdb_moves_total", "counter",
                         "Learned (MAC, VLAN) FDB entries that moved onto this port from another port of the bridge, "
                         "counted from netlink FDB events. Moves during an event overflow (ENOBUFS, then a resync) "
                         "count once at most per MAC. The exporter logs event=fdb_move naming the MAC.")
    ns = snap.netns
    for br in snap.bridges:
        i = br.info
        bl = labels(netns=ns, bridge=br.name)
        if i.fdb_max_learned is not None:  # older kernels: no series rather than a made-up "no limit"
            limit.add(bl, i.fdb_max_learned)
        if i.fdb_n_learned is not None:
            learned.add(bl, i.fdb_n_learned)
        for p in br.ports:
            if p.fdb_moves is None or not keep(p.name):
                continue
            row = cache.get((ns, br.name, p.name), lambda d=p.name, b=br.name: (
                f"kvmnet_port_fdb_moves_total{labels(netns=ns, bridge=b, device=d)} ",))
            moves.lines.append(row[0] + str(p.fdb_moves))
    return [limit, learned, moves]


class FdbCollector:
    """kvmnet_port_fdb_entries and kvmnet_bridge_fdb_entries of one namespace."""

    name = "fdb"

    def __init__(self, netns: str, include: re.Pattern | None = None, exclude: re.Pattern | None = None,
                 source: NetlinkSource | None = None) -> None:
        self.netns = netns
        self.keep = _filter(include, exclude)
        self.source = source if source is not None else NetlinkSource(netns)  # normally the service's
        self._cache: dict = {}
        self._internals = _Prefixes()

    def collect(self) -> Iterable[MetricFamily]:
        snap = self.source.snapshot(stats=False)
        out = fdb_families(snap, self.keep, self._cache)
        out += fdb_internal_families(snap, self.keep, self._internals)
        self._internals.prune()
        return out

    def close(self) -> None:
        self.source.close()
