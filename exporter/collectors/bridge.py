"""--collector.bridge: bridges and their ports: counters, carrier, STP state and the tap -> guest mapping.

This and collectors/fdb.py read one `NetlinkSource` per namespace (the service owns it), so operators can drop the
FDB part (`--no-collector.fdb`): without it the source never subscribes to or dumps the FDB.

    # HELP kvmnet_port_transmit_bytes_total Bytes the host sent out of this bridge port. Host's view: a tap's transmit is its guest's receive.
    # TYPE kvmnet_port_transmit_bytes_total counter
    kvmnet_port_transmit_bytes_total{netns="lab",bridge="br0",device="vm1eth0"} 123456
    kvmnet_port_up{netns="lab",bridge="br0",device="vm1eth0"} 1
    kvmnet_port_stp_state{netns="lab",bridge="br0",device="vm1eth0",state="forwarding"} 1
    kvmnet_port_info{netns="lab",bridge="br0",device="vm1eth0",kind="tap",mac="fe:..",guest="vm1",lower=""} 1
    kvmnet_port_info{netns="lab",bridge="",device="macvtap0",kind="macvtap",mac="52:..",guest="web",lower="eth0"} 1
    kvmnet_bridge_ports{netns="lab",bridge="br0"} 2
    kvmnet_bridge_info{netns="lab",bridge="br0",mac="..",stp="true",guest=""} 1

macvtap devices (libvirt `<interface type='direct'>`) are guest NICs that are no bridge's port: they are reported
in the same kvmnet_port_* families with bridge="" and their lower device in kvmnet_port_info's `lower`; they have no
STP state (no kvmnet_port_stp_state) and no FDB. Their counters run the other way from a tap's: a macvtap receives
what goes to its guest (the lower device hands it the frame), so its receive is the guest's receive.
`guest` on kvmnet_bridge_info names the guest a bridge belongs to (Proxmox's per-guest firewall bridge fwbrNiM).

Bridge internals (the kernel's own view of trouble):

    kvmnet_port_transmit_queue_length{netns="lab",bridge="br0",device="vm1eth0"} 1000
    kvmnet_port_stp_transitions_total{netns="lab",bridge="br0",device="vm1eth0",to="blocking"} 0
    kvmnet_port_stp_bpdus_total{netns="lab",bridge="br0",device="vm1eth0",direction="receive"} 0   (+ tcns)
    kvmnet_port_qdisc_drops_total{netns="lab",bridge="br0",device="vm1eth0"} 0   (+ overlimits, requeues)
    kvmnet_port_qdisc_backlog_bytes{netns="lab",bridge="br0",device="vm1eth0"} 0 (+ backlog_packets)
    kvmnet_bridge_stp_root_info{netns="lab",bridge="br0",root_id="8000.0ae84fc56a16"} 1
    kvmnet_bridge_stp_root_port{netns="lab",bridge="br0"} 0   (+ root_path_cost, topology_change)
    kvmnet_guest_mac_conflict{netns="lab",bridge="br0",device="vm2eth0",guest="vm2",mac="0a:.."} 1   (guests with a MAC)

Samples come sorted by bridge, then device (the snapshot's order), so output is stable. `include`/`exclude`
(`--device.include/exclude`) are searched (re.search) in bridge port names only; bridges are always reported, and
kvmnet_bridge_ports always counts every port.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from ..exposition import MetricFamily, labels, with_label
from ..sources.netlink import STP_STATES, BridgeSnapshot, Counters, NetlinkSource

FIELDS = Counters._fields
GUEST_KINDS = ("tap", "tun", "macvtap")  # device kinds that are a guest's own NIC

log = logging.getLogger("kvmnet.collectors.bridges")  # the name the logs have always had

_HOST_VIEW = ("Host's view: a tap's transmit is its guest's receive; a macvtap (bridge=\"\") the other way round, "
              "its receive is its guest's receive.")
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
        return f"{_WHAT[unit]} {verb} this bridge port or macvtap. {_HOST_VIEW}"
    return (f"{_WHAT[unit]} {verb} the bridge device itself (frames to and from the host's own stack on the "
            f"bridge, not the traffic it forwards between ports).")


def _filter(include: re.Pattern | None, exclude: re.Pattern | None) -> Callable[[str], bool]:
    def keep(name: str) -> bool:
        if include is not None and not include.search(name):
            return False
        return exclude is None or not exclude.search(name)
    return keep


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
_STP_NAMES = ("kvmnet_port_stp_transitions_total", "kvmnet_port_stp_bpdus_total", "kvmnet_port_stp_tcns_total")
_STP_LABELS = ("to", "direction", "direction")
_STP = (  # (StpCounters field, family index, label value), in StpCounters' order
    ("transition_blk", 0, "blocking"), ("transition_fwd", 0, "forwarding"),
    ("rx_bpdu", 1, "receive"), ("tx_bpdu", 1, "transmit"),
    ("rx_tcn", 2, "receive"), ("tx_tcn", 2, "transmit"),
)


class _Rows:
    """Rendered line prefixes per port and bridge, kept across scrapes: a scrape of 1000 taps is ~19k samples, and
    building each line from labels costs ~16 ms where `prefix + str(value)` costs ~4 ms (~2.5 kB per port).
    Rows of devices not seen in a scrape are dropped, so the cache follows the topology."""

    def __init__(self) -> None:
        self.ports: dict[tuple, tuple] = {}
        self.bridges: dict[tuple, tuple] = {}

    def port(self, key: tuple) -> tuple:
        """key: (netns, bridge, device, kind, mac, guest, lower)."""
        row = self.ports.get(key)
        if row is None:
            ns, bridge, device, kind, mac, guest, lower = key
            # Only the base label set goes through the (process-wide, LRU) label cache; the variants are built
            # here and live in this row, so memory stays one row per port.
            pl = labels(netns=ns, bridge=bridge, device=device)
            counters = tuple(f"kvmnet_port_{d}_{u}_total{pl} " for _f, d, u in _COUNTERS)
            stp = tuple(f"kvmnet_port_stp_state{with_label(pl, 'state', s)} " for s in STP_STATES)
            il = with_label(with_label(with_label(with_label(pl, "kind", kind), "mac", mac), "guest", guest),
                            "lower", lower)
            xstp = tuple(f"{_STP_NAMES[i]}{with_label(pl, _STP_LABELS[i], v)} " for _f, i, v in _STP)
            qdisc = tuple(f"kvmnet_port_qdisc_{suffix}{pl} " for _f, suffix, _k, _h in _QDISC)
            row = self.ports[key] = (counters, f"kvmnet_port_up{pl} ", f"kvmnet_port_carrier_changes_total{pl} ",
                                     stp, f"kvmnet_port_info{il} 1", f"kvmnet_port_transmit_queue_length{pl} ",
                                     xstp, qdisc)
        return row

    def bridge(self, ns: str, br, guest: str = "") -> tuple:
        key = (ns, br.name, br.mac, br.stp_enabled, guest)
        row = self.bridges.get(key)
        if row is None:
            bl = labels(netns=ns, bridge=br.name)
            counters = tuple(f"kvmnet_bridge_{d}_{u}_total{bl} " for _f, d, u in _COUNTERS)
            il = labels(netns=ns, bridge=br.name, mac=br.mac, stp="true" if br.stp_enabled else "false", guest=guest)
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
                        "A bridge port or macvtap: its kind (tap, tun, veth, macvtap, ...), its own MAC (host "
                        "side), the guest behind it (never empty for a guest's port: the tap name when nothing "
                        "names it; empty for uplinks), and for a macvtap (bridge=\"\") its lower device.")
    br_c = [MetricFamily(f"kvmnet_bridge_{d}_{u}_total", "counter", _counter_help("bridge", d, u))
            for _f, d, u in _COUNTERS]
    br_up = MetricFamily("kvmnet_bridge_up", "gauge",
                         "Carrier of the bridge device (IFF_LOWER_UP): 1 while at least one port is up.")
    br_ports = MetricFamily("kvmnet_bridge_ports", "gauge", "Ports enslaved to the bridge.")
    br_info = MetricFamily("kvmnet_bridge_info", "gauge",
                           "A bridge: its MAC, whether kernel STP is on, and the guest it belongs to if it is a "
                           "guest's own (Proxmox's firewall bridge fwbrNiM), else empty.")
    txq = MetricFamily("kvmnet_port_transmit_queue_length", "gauge",
                       "Transmit queue length of the port in packets (IFLA_TXQLEN): how much the host queues "
                       "towards a guest before its qdisc drops.")
    xstp = [MetricFamily(_STP_NAMES[0], "counter",
                         "STP state transitions of the port into blocking and into forwarding (bridge xstats)."),
            MetricFamily(_STP_NAMES[1], "counter",
                         "STP BPDUs the bridge received on and sent out of this port (bridge xstats)."),
            MetricFamily(_STP_NAMES[2], "counter",
                         "STP topology change notifications received on and sent out of this port (bridge xstats).")]
    qd = [MetricFamily(f"kvmnet_port_qdisc_{suffix}", kind, help) for _f, suffix, kind, help in _QDISC]
    # StpCounters' order is _STP's: blk, fwd (transitions), rx, tx BPDUs, rx, tx TCNs.
    xstp_lines = [xstp[i].lines for _f, i, _v in _STP]
    qd_lines = [f.lines for f in qd]
    txq_l = txq.lines

    # Counters in the order of _COUNTERS, as indices into the Counters tuple (kernel order).
    idx = [FIELDS.index(f) for f, _d, _u in _COUNTERS]
    pc_lines = [f.lines for f in port_c]
    bc_lines = [f.lines for f in br_c]
    up_l, flaps_l, stp_l, info_l = up.lines, flaps.lines, stp.lines, info.lines
    seen_p, seen_b = set(), set()
    for br in snap.bridges:
        bg = guests.get(br.name)
        bguest = bg.name if bg is not None else ""
        counters, up_p, ports_p, binfo = rows.bridge(ns, br, bguest)  # always: the device filter is for ports
        seen_b.add((ns, br.name, br.mac, br.stp_enabled, bguest))
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
            # A guest's port is never unnamed: a tap nothing names carries its own name (the fallback the
            # prober's discovery uses too, so kvmnet_port_info joins kvmnet_guest_up on guest).
            gname = g.name if g is not None else (p.name if p.kind in GUEST_KINDS else "")
            key = (ns, br.name, p.name, p.kind, p.mac, gname, "")
            counters, up_p, flaps_p, stp_prefixes, pinfo, txq_p, xstp_p, qd_p = rows.port(key)
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
            txq_l.append(txq_p + str(p.txqlen))
            if p.stp is not None:
                for lines, prefix, v in zip(xstp_lines, xstp_p, p.stp):
                    lines.append(prefix + str(v))
            q = p.qdisc
            if q is not None:
                for lines, prefix, v in zip(qd_lines, qd_p, (q.drops, q.overlimits, q.requeues, q.backlog, q.qlen)):
                    lines.append(prefix + str(v))
    for p in snap.macvtaps:
        if not keep(p.name):
            continue
        g = guests.get(p.name)
        key = (ns, "", p.name, p.kind, p.mac, g.name if g is not None else p.name, p.lower)
        counters, up_p, flaps_p, _stp, pinfo, *_internals = rows.port(key)
        seen_p.add(key)
        st = p.stats
        for lines, prefix, i in zip(pc_lines, counters, idx):
            lines.append(prefix + str(st[i]))
        up_l.append(up_p + ("1" if p.up else "0"))
        flaps_l.append(flaps_p + str(p.carrier_changes))
        info_l.append(pinfo)
    rows.prune(seen_p, seen_b)
    return port_c + [up, flaps, stp, info] + br_c + [br_up, br_ports, br_info, txq, *xstp, *qd]


# -- bridge internals: tap queues, STP counters and root, guests sharing a MAC -----------------------------------

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


def bridge_stp_families(snap: BridgeSnapshot) -> list[MetricFamily]:
    """The bridge's view of the spanning tree: who is root, through which port, at what cost."""
    # Only root_id as a label: a bridge's own id follows its MAC (the lowest port MAC unless set), and a label
    # that changes with it would read as a root change.
    info = MetricFamily("kvmnet_bridge_stp_root_info", "gauge",
                        "The STP root bridge as this bridge sees it (IFLA_BR_ROOT_ID, priority.MAC, as in sysfs "
                        "bridge/root_id). Without STP, or when it is the root, that is the bridge's own id.")
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
        info.add(labels(netns=ns, bridge=br.name, root_id=i.root_id), 1)
        port.add(bl, i.root_port)
        cost.add(bl, i.root_path_cost)
        tc.add(bl, i.topology_change)
    return [info, port, cost, tc]


def mac_conflict_family(snap: BridgeSnapshot, guests: dict) -> MetricFamily:
    """Per guest port whose guest has a configured MAC (QEMU, libvirt, lab file): how many guests on the bridge are
    configured with that MAC. 1 is normal; 2 or more is a cloned guest or a copy-pasted MAC."""
    fam = MetricFamily("kvmnet_guest_mac_conflict", "gauge",
                       "Guests on this bridge configured with the same MAC as this guest, itself included (from the "
                       "guests' identity: QEMU command line, libvirt XML, lab file): 1 is normal, 2 or more a "
                       "conflict.")
    ns = snap.netns
    for br in snap.bridges:
        by_mac: dict[str, list] = {}
        for p in br.ports:
            g = guests.get(p.name)
            mac = getattr(g, "mac", "") if g is not None else ""
            if mac:
                by_mac.setdefault(mac.lower(), []).append((p.name, g.name))
        for mac, who in sorted(by_mac.items()):
            for device, name in who:
                fam.add(labels(netns=ns, bridge=br.name, device=device, guest=name, mac=mac), len(who))
    return fam


class BridgeCollector:
    """kvmnet_port_* (but FDB) and kvmnet_bridge_* of one namespace. `identity.lookup(netns)` names the guests."""

    name = "bridge"

    def __init__(self, netns: str, identity=None, include: re.Pattern | None = None,
                 exclude: re.Pattern | None = None, source: NetlinkSource | None = None) -> None:
        self.netns = netns
        self.identity = identity
        self.keep = _filter(include, exclude)
        self.source = source if source is not None else NetlinkSource(netns)  # normally the service's
        self._rows = _Rows()

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
        ns = labels(netns=self.netns)
        resyncs.add(ns, self.source.resyncs)
        intr = MetricFamily("kvmnet_netlink_dump_interrupted_total", "counter",
                            "Netlink dumps the kernel marked inconsistent (NLM_F_DUMP_INTR: the table changed "
                            "under it). Each is asked again, up to 3 times; never used.")
        intr.add(ns, self.source.dumps_interrupted)
        errs = MetricFamily("kvmnet_netlink_errors_total", "counter",
                            "Netlink requests that failed: a kernel error reply, a dump still interrupted after "
                            "its retries, a malformed message, a timeout. That scrape's collector fails.")
        errs.add(ns, self.source.errors)
        out = bridge_families(snap, guests, self.keep, self._rows) + bridge_stp_families(snap)
        out.append(mac_conflict_family(snap, guests))
        return out + [resyncs, intr, errs]

    def close(self) -> None:
        """Drop the namespace's sockets (the service's source, shared with the fdb collector and the prober's
        discovery: it reopens on next use).
        Call it when the namespace is gone, so dead namespaces are not kept alive by our sockets."""
        self.source.close()
