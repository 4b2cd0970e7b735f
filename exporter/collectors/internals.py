"""What the Linux bridge itself knows about trouble: STP counters and root, tap queues, learning limit, MAC moves,
duplicate guest MACs. Pure renderers over a BridgeSnapshot; the `bridge` and `fdb` collectors call them.

`bridge` collector:

    kvmnet_port_transmit_queue_length{netns="lab",bridge="br0",device="vm1eth0"} 1000
    kvmnet_port_stp_transitions_total{netns="lab",bridge="br0",device="vm1eth0",to="blocking"} 0
    kvmnet_port_stp_bpdus_total{netns="lab",bridge="br0",device="vm1eth0",direction="receive"} 0
    kvmnet_port_stp_tcns_total{netns="lab",bridge="br0",device="vm1eth0",direction="transmit"} 0
    kvmnet_port_qdisc_drops_total{netns="lab",bridge="br0",device="vm1eth0"} 0     (+ overlimits, requeues)
    kvmnet_port_qdisc_backlog_bytes{netns="lab",bridge="br0",device="vm1eth0"} 0   (+ backlog_packets)
    kvmnet_bridge_stp_root_info{netns="lab",bridge="br0",root_id="8000.0ae84fc56a16",bridge_id="8000.0ae84fc56a16"} 1
    kvmnet_bridge_stp_root_port{netns="lab",bridge="br0"} 0                       (+ root_path_cost, topology_change)
    kvmnet_guest_mac_conflict{netns="lab",bridge="br0",device="vm2eth0",guest="vm2",mac="0a:.."} 2   (only conflicts)

`fdb` collector:

    kvmnet_bridge_fdb_learned_limit{netns="lab",bridge="br0"} 0
    kvmnet_bridge_fdb_learned_entries{netns="lab",bridge="br0"} 3
    kvmnet_port_fdb_moves_total{netns="lab",bridge="br0",device="vm1eth0"} 0

Ports and bridges come in the snapshot's order (sorted); rendered prefixes are kept per device across scrapes, as
in bridges._Rows, so the ~13 extra series per port cost string concatenation only.
"""
from __future__ import annotations

from typing import Callable

from ..exposition import MetricFamily, labels, with_label
from ..sources.netlink import BridgeSnapshot

_QDISC = (  # (Qdisc field, metric suffix, kind, help)
    ("drops", "drops_total", "counter",
     "Packets the port's root qdisc dropped (TCA_STATS_QUEUE): a shaped tap over its rate, or a guest that does "
     "not drain its queue."),
    ("overlimits", "overlimits_total", "counter",
     "Times the port's root qdisc held back a packet because a rate limit (tbf, htb, ...) was reached."),
    ("requeues", "requeues_total", "counter",
     "Packets the port's root qdisc requeued because the device was busy."),
    ("backlog", "backlog_bytes", "gauge", "Bytes waiting in the port's root qdisc now."),
    ("qlen", "backlog_packets", "gauge", "Packets waiting in the port's root qdisc now."),
)
_STP = (  # (StpCounters field, family index, label value)
    ("transition_blk", 0, "blocking"), ("transition_fwd", 0, "forwarding"),
    ("rx_bpdu", 1, "receive"), ("tx_bpdu", 1, "transmit"),
    ("rx_tcn", 2, "receive"), ("tx_tcn", 2, "transmit"),
)


class _Prefixes:
    """Rendered `name{labels} ` prefixes per (kind, netns, bridge, device), pruned to what the last scrape saw."""

    def __init__(self) -> None:
        self.rows: dict[tuple, tuple[str, ...]] = {}
        self.seen: set = set()

    def get(self, key: tuple, make: Callable[[], tuple[str, ...]]) -> tuple[str, ...]:
        self.seen.add(key)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = make()
        return row

    def prune(self) -> None:
        if len(self.rows) > len(self.seen):
            self.rows = {k: v for k, v in self.rows.items() if k in self.seen}
        self.seen = set()


def port_families(snap: BridgeSnapshot, keep: Callable[[str], bool], cache: _Prefixes) -> list[MetricFamily]:
    """Transmit queue length, STP xstats and root qdisc counters of every (kept) bridge port."""
    txq = MetricFamily("kvmnet_port_transmit_queue_length", "gauge",
                       "Transmit queue length of the port in packets (IFLA_TXQLEN): how much the host queues "
                       "towards a guest before its qdisc drops.")
    stp = [MetricFamily("kvmnet_port_stp_transitions_total", "counter",
                        "STP state transitions of the port into blocking and into forwarding (bridge xstats)."),
           MetricFamily("kvmnet_port_stp_bpdus_total", "counter",
                        "STP BPDUs the bridge received on and sent out of this port (bridge xstats)."),
           MetricFamily("kvmnet_port_stp_tcns_total", "counter",
                        "STP topology change notifications received on and sent out of this port (bridge xstats).")]
    qd = [MetricFamily(f"kvmnet_port_qdisc_{suffix}", kind, help) for _f, suffix, kind, help in _QDISC]
    ns = snap.netns
    for br in snap.bridges:
        for p in br.ports:
            if not keep(p.name):
                continue

            def make(bridge=br.name, device=p.name) -> tuple[str, ...]:
                pl = labels(netns=ns, bridge=bridge, device=device)
                keys = ("to", "direction", "direction")
                return ((f"kvmnet_port_transmit_queue_length{pl} ",)
                        + tuple(f"{stp[i].name}{with_label(pl, keys[i], v)} " for _f, i, v in _STP)
                        + tuple(f"kvmnet_port_qdisc_{suffix}{pl} " for _f, suffix, _k, _h in _QDISC))

            row = cache.get((ns, br.name, p.name), make)
            txq.lines.append(row[0] + str(p.txqlen))
            if p.stp is not None:
                for j, (_f, i, _v) in enumerate(_STP):
                    stp[i].lines.append(row[1 + j] + str(p.stp[j]))
            if p.qdisc is not None:
                q = p.qdisc
                for j, (f, _s, _k, _h) in enumerate(_QDISC):
                    qd[j].lines.append(row[7 + j] + str(getattr(q, f)))
    return [txq, *stp, *qd]


def bridge_stp_families(snap: BridgeSnapshot) -> list[MetricFamily]:
    """The bridge's view of the spanning tree: who is root, through which port, at what cost."""
    info = MetricFamily("kvmnet_bridge_stp_root_info", "gauge",
                        "The STP root bridge as this bridge sees it (IFLA_BR_ROOT_ID, priority.MAC) and this "
                        "bridge's own id; root_id == bridge_id when this bridge is the root (always without STP).")
    port = MetricFamily("kvmnet_bridge_stp_root_port", "gauge",
                        "Port number of the bridge's root port (IFLA_BR_ROOT_PORT); 0 when it is the root itself.")
    cost = MetricFamily("kvmnet_bridge_stp_root_path_cost", "gauge",
                        "STP path cost from this bridge to the root (IFLA_BR_ROOT_PATH_COST).")
    tc = MetricFamily("kvmnet_bridge_stp_topology_change", "gauge",
                      "1 while the bridge is in STP topology change (IFLA_BR_TOPOLOGY_CHANGE): forwarding tables "
                      "age out fast and frames flood.")
    ns = snap.netns
    for br in snap.bridges:
        i = br.info
        bl = labels(netns=ns, bridge=br.name)
        info.add(labels(netns=ns, bridge=br.name, root_id=i.root_id, bridge_id=i.bridge_id), 1)
        port.add(bl, i.root_port)
        cost.add(bl, i.root_path_cost)
        tc.add(bl, i.topology_change)
    return [info, port, cost, tc]


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


def mac_conflict_family(snap: BridgeSnapshot, guests: dict) -> MetricFamily:
    """Guests on one bridge configured (QEMU, libvirt, lab file) with the same MAC: each of them gets a sample, the
    value is how many guests share the MAC. No sample without a conflict."""
    fam = MetricFamily("kvmnet_guest_mac_conflict", "gauge",
                       "Guests on this bridge configured with the same MAC as this guest, itself included (from the "
                       "guests' identity: QEMU command line, libvirt XML, lab file). Present only when >= 2.")
    ns = snap.netns
    for br in snap.bridges:
        by_mac: dict[str, list] = {}
        for p in br.ports:
            g = guests.get(p.name)
            mac = getattr(g, "mac", "") if g is not None else ""
            if mac:
                by_mac.setdefault(mac.lower(), []).append((p.name, g.name))
        for mac, who in sorted(by_mac.items()):
            if len(who) < 2:
                continue
            for device, name in who:
                fam.add(labels(netns=ns, bridge=br.name, device=device, guest=name, mac=mac), len(who))
    return fam
