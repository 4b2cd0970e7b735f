"""--collector.fdb: bridge FDB sizes by type, per port and per bridge.

    kvmnet_port_fdb_entries{netns="lab",bridge="br0",device="vm1eth0",type="learned"} 1
    kvmnet_bridge_fdb_entries{netns="lab",bridge="br0",type="local"} 3

Read from the namespace's `NetlinkSource` that collectors/bridge.py uses too; kvmnet_bridge_fdb_entries counts
every port whatever `--device.include/exclude` say.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from ..exposition import MetricFamily, labels, with_label
from ..sources.netlink import FDB_TYPES, BridgeSnapshot, NetlinkSource
from .bridge import _filter


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


class FdbCollector:
    """kvmnet_port_fdb_entries and kvmnet_bridge_fdb_entries of one namespace."""

    name = "fdb"

    def __init__(self, netns: str, include: re.Pattern | None = None, exclude: re.Pattern | None = None,
                 source: NetlinkSource | None = None) -> None:
        self.netns = netns
        self.keep = _filter(include, exclude)
        self.source = source if source is not None else NetlinkSource(netns)  # normally the service's
        self._cache: dict = {}

    def collect(self) -> Iterable[MetricFamily]:
        return fdb_families(self.source.snapshot(stats=False), self.keep, self._cache)

    def close(self) -> None:
        self.source.close()
