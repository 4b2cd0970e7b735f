"""--collector.probe: the prober's counters as kvmnet_guest_* and its sockets as kvmnet_probe_socket_*.

    # HELP kvmnet_guest_up 1 while the guest answers ping; 0 after `down_after` consecutive lost probes.
    # TYPE kvmnet_guest_up gauge
    kvmnet_guest_up{netns="seed-host",guest="vm1"} 1
    kvmnet_guest_ping_rtt_seconds_bucket{netns="seed-host",guest="vm1",le="4e-05"} 118
    kvmnet_guest_info{netns="seed-host",guest="vm1",address="192.168.98.11",mac="0a:e8:4f:c5:6a:16",bridge="br0",device="vm1eth0"} 1

Every target has all its series from the first scrape: a guest that never answers shows up 0 and requests rising.
"""
from __future__ import annotations

from typing import Any, Iterable

from ..exposition import MetricFamily, format_value, labels, with_label
from ..prober.packets import FAMILY_NAME
from ..prober.state import BUCKETS


_BOUNDS = tuple(format_value(float(b)) for b in BUCKETS) + ("+Inf",)


class GuestCollector:
    """Renders the prober's state; `collect()` runs in a scrape thread and only copies counters under a lock.

    Each guest's line prefixes (`name{labels} `, and the 21 `le` bucket prefixes of its histogram) are rendered
    once and kept while the guest's labels stay, as the bridge collector keeps its port rows: a scrape of 1000
    guests is then one %-format per guest for its histogram and string joins for the rest, not 21k label
    renderings."""

    name = "probe"
    netns = ""

    def __init__(self, prober: Any) -> None:
        self.prober = prober
        self._rows: dict[tuple, tuple] = {}

    def _row(self, key: tuple, t: Any) -> tuple:
        lbl = labels(netns=t.netns, guest=t.name)
        h = "kvmnet_guest_ping_rtt_seconds"
        pl = lbl.replace("%", "%%")  # a '%' in a label value must survive the template
        row = (f"kvmnet_guest_up{lbl} ",
               # The whole histogram as one %-template: 20 bucket counts, +Inf, _sum, _count in one C-level format.
               "\n".join([f"{h}_bucket{with_label(lbl, 'le', b).replace('%', '%%')} %d" for b in _BOUNDS]
                         + [f"{h}_sum{pl} %s", f"{h}_count{pl} %d"]),
               f"kvmnet_guest_ping_requests_total{lbl} ", f"kvmnet_guest_ping_replies_total{lbl} ",
               f"kvmnet_guest_ping_send_errors_total{lbl} ", f"kvmnet_guest_last_reply_timestamp_seconds{lbl} ",
               "kvmnet_guest_info" + labels(netns=t.netns, guest=t.name, address=str(t.address), mac=t.mac,
                                            bridge=t.bridge, device=t.device) + " 1")
        self._rows[key] = row
        return row

    def collect(self) -> Iterable[MetricFamily]:
        up = MetricFamily("kvmnet_guest_up", "gauge",
                          "1 while the guest answers ping; 0 after down_after consecutive lost probes "
                          "(and before its first reply).")
        rtt = MetricFamily("kvmnet_guest_ping_rtt_seconds", "histogram",
                           "Round-trip time of each echo reply, from kernel send and receive timestamps.")
        req = MetricFamily("kvmnet_guest_ping_requests_total", "counter",
                           "Echo requests attempted, including those the kernel refused to send. "
                           "Loss ratio: 1 - replies/requests.")
        rep = MetricFamily("kvmnet_guest_ping_replies_total", "counter", "Echo replies received in time.")
        err = MetricFamily("kvmnet_guest_ping_send_errors_total", "counter",
                           "Echo requests that could not be sent (no route, namespace gone, no ICMP socket).")
        last = MetricFamily("kvmnet_guest_last_reply_timestamp_seconds", "gauge",
                            "Unix time of the last echo reply; 0 if none yet.")
        info = MetricFamily("kvmnet_guest_info", "gauge",
                            "A probed guest: its address and, where known, MAC, bridge and bridge port (tap).")
        rows, seen = self._rows, set()
        up_l, rtt_l, req_l, rep_l, err_l, last_l, info_l = (up.lines, rtt.lines, req.lines, rep.lines, err.lines,
                                                            last.lines, info.lines)
        for t, is_up, requests, replies, errors, last_reply, cum, total, count in self.prober.snapshot():
            key = (t.netns, t.name, t.address, t.mac, t.bridge, t.device)
            seen.add(key)
            row = rows.get(key) or self._row(key, t)
            up_l.append(row[0] + ("1" if is_up else "0"))
            rtt_l.append(row[1] % (*cum, count, format_value(float(total)), count))
            req_l.append(row[2] + str(requests))
            rep_l.append(row[3] + str(replies))
            err_l.append(row[4] + str(errors))
            last_l.append(row[5] + format_value(last_reply))
            info_l.append(row[6])
        if len(rows) > len(seen):  # guests that went away (or changed labels): their prefixes go too
            for k in [k for k in rows if k not in seen]:
                del rows[k]
        sock = MetricFamily("kvmnet_probe_socket_up", "gauge",
                            "1 while the prober has its ICMP socket in this namespace and family; 0 when it cannot "
                            "(namespace gone, not permitted: see the log).")
        mode = MetricFamily("kvmnet_probe_socket_info", "gauge",
                            "The prober's ICMP sockets: mode raw (CAP_NET_RAW) or dgram (ping_group_range).")
        for netns, family, m in self.prober.sockets():
            sock.add(labels(netns=netns, family=family), 1)
            mode.add(labels(netns=netns, family=family, mode=m), 1)
        for (netns, fam) in sorted(self.prober.unavailable()):
            sock.add(labels(netns=netns, family=FAMILY_NAME[fam]), 0)
        return [up, rtt, req, rep, err, last, info, sock, mode]
