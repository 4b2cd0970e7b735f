"""--collector.identity: guest run states (the guest names on kvmnet_port_info come from the same source).

    # HELP kvmnet_guest_state Run state of the guest as a state set: 1 for the current state, 0 for the others.
    # TYPE kvmnet_guest_state gauge
    kvmnet_guest_state{netns="lv",guest="web",state="running"} 1
    kvmnet_guest_state{netns="lv",guest="web",state="paused"} 0

States: running, paused, shutdown (shutting down), shutoff (stopped on purpose: destroyed, shut down), crashed
(libvirt's crashed, or shut off because its QEMU crashed), pmsuspended, blocked, unknown. From libvirt's files
(live status XML, the defined domains, the domain log's last stop reason) and, for QEMUs with a `-qmp unix:`
monitor (kvmnet-setup's guests), QMP query-status. Guests whose state nothing tells (QEMU without a QMP socket
this exporter may open, a light guest) have no kvmnet_guest_state: absence means unknown, not running.
`guest` is the same name as on kvmnet_port_info and kvmnet_guest_up, so the three join on (netns, guest).
"""
from __future__ import annotations

from collections.abc import Iterable

from ..exposition import MetricFamily, labels
from ..sources.identity import GUEST_STATES


class IdentityCollector:
    name = "identity"

    def __init__(self, netns: str, directory) -> None:
        self.netns = netns
        self.directory = directory

    def collect(self) -> Iterable[MetricFamily]:
        fam = MetricFamily("kvmnet_guest_state", "gauge",
                           "Run state of the guest (libvirt status files, QMP query-status) as a state set: 1 for "
                           "the current state, 0 for the others. shutoff is a stop on purpose; a QEMU that died "
                           "under libvirt is crashed.")
        for guest, state in sorted(self.directory.states(self.netns).items()):
            for s in GUEST_STATES:
                fam.add(labels(netns=self.netns, guest=guest, state=s), 1 if s == state else 0)
        return [fam]
