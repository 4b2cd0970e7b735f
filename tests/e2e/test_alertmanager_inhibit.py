"""deploy/alertmanager.yml in Debian's Alertmanager: each inhibition and the grouping, with alerts shaped as the
shipped rules shape them (the labels come from dashboards/kvmnet.rules.yml and the promtool cases), posted to its
API. Each scenario uses its own instance so they do not meet. The receivers point at a recorder; which alerts are
suppressed is read from Alertmanager's own API and from what it notifies.

The faults behind these alerts, raised for real, are in test_alerting_live.py (a QEMU guest, the exporter).
"""
from __future__ import annotations

import datetime as dt
import time

import pytest

from tests.e2e.alerting import ALERTMANAGER, Alertmanager, Recorder, am_test_config, firing_alerts

pytestmark = pytest.mark.timeout(120)


def alert(name: str, severity: str, **labels: str) -> dict:
    now = dt.datetime.now(dt.UTC)
    # Prometheus sends no empty labels: an uplink's alert has no guest label at all (the matcher guest="" matches it).
    labels = {k: v for k, v in labels.items() if v}
    return {"labels": {"alertname": name, "severity": severity, "job": "kvmnet", **labels},
            "annotations": {"summary": name},
            "startsAt": now.isoformat(), "endsAt": (now + dt.timedelta(minutes=10)).isoformat()}


NS = {"netns": "lab"}
# (scenario, alerts, the ones that must notify). Everything else in a scenario must be inhibited.
SCENARIOS = [
    ("exporter down silences its host",
     [alert("KvmnetExporterDown", "critical", instance="h1"),
      alert("KvmnetGuestDown", "critical", instance="h1", **NS, guest="vm1", bridge="br0", device="vm1eth0"),
      alert("KvmnetCollectorFailing", "warning", instance="h1", **NS, collector="bridge"),
      alert("KvmnetPortDropsRising", "warning", instance="h1", **NS, bridge="br0", device="vm1eth0")],
     {("KvmnetExporterDown", "h1")}),
    ("bridge down silences its ports and guests, not another bridge's",
     [alert("KvmnetBridgeDown", "critical", instance="h2", **NS, bridge="br0"),
      alert("KvmnetTapCarrierLost", "critical", instance="h2", **NS, bridge="br0", device="vm1eth0", guest="vm1"),
      alert("KvmnetGuestDown", "critical", instance="h2", **NS, guest="vm1", bridge="br0", device="vm1eth0"),
      alert("KvmnetPortCarrierLost", "warning", instance="h2", **NS, bridge="br0", device="eth1", kind="physical",
            guest=""),
      alert("KvmnetGuestDown", "critical", instance="h2", **NS, guest="vm9", bridge="br1", device="vm9eth0")],
     {("KvmnetBridgeDown", "h2"), ("KvmnetGuestDown", "h2", "vm9")}),
    ("uplink down silences its bridge's ports and guests",
     [alert("KvmnetPortCarrierLost", "warning", instance="h3", **NS, bridge="br0", device="eth1", kind="physical",
            guest=""),
      alert("KvmnetPortCarrierLost", "warning", instance="h3", **NS, bridge="br0", device="veth-g", kind="veth",
            guest="g"),
      alert("KvmnetGuestPacketLoss", "warning", instance="h3", **NS, guest="vm2"),  # no bridge label: not its
      alert("KvmnetGuestDown", "critical", instance="h3", **NS, guest="vm1", bridge="br0", device="vm1eth0"),
      alert("KvmnetStpStateFlapping", "warning", instance="h3", **NS, bridge="br0", device="vm1eth0",
            state="forwarding")],
     {("KvmnetPortCarrierLost", "h3", ""), ("KvmnetGuestPacketLoss", "h3", "vm2")}),
    ("a dead guest pages once: its tap alert, not its ping alerts",
     [alert("KvmnetTapCarrierLost", "critical", instance="h4", **NS, bridge="br0", device="vm1eth0", guest="vm1"),
      alert("KvmnetGuestDown", "critical", instance="h4", **NS, guest="vm1", bridge="br0", device="vm1eth0"),
      alert("KvmnetPortDropsRising", "warning", instance="h4", **NS, bridge="br0", device="vm1eth0"),
      alert("KvmnetGuestDown", "critical", instance="h4", **NS, guest="vm2", bridge="br0", device="vm2eth0")],
     {("KvmnetTapCarrierLost", "h4", "vm1"), ("KvmnetGuestDown", "h4", "vm2")}),
    ("a guest that does not answer: its loss and latency say nothing more",
     [alert("KvmnetGuestDown", "critical", instance="h5", **NS, guest="vm1"),
      alert("KvmnetGuestLatencyHigh", "warning", instance="h5", **NS, guest="vm1")],
     {("KvmnetGuestDown", "h5", "vm1")}),
    ("a paused guest does not page as lost",
     [alert("KvmnetGuestPaused", "warning", instance="h6", **NS, guest="vm1", state="paused"),
      alert("KvmnetGuestDown", "critical", instance="h6", **NS, guest="vm1", bridge="br0", device="vm1eth0"),
      alert("KvmnetTapCarrierLost", "critical", instance="h6", **NS, bridge="br0", device="vm1eth0",
            guest="vm1")],
     {("KvmnetGuestPaused", "h6", "vm1")}),
    ("a stalled prober: its host's guests are not down, the checker is",
     [alert("KvmnetProbingStopped", "critical", instance="h8"),
      alert("KvmnetGuestDown", "critical", instance="h8", **NS, guest="vm1", bridge="br0", device="vm1eth0"),
      alert("KvmnetGuestDown", "critical", instance="h8", **NS, guest="vm2", bridge="br0", device="vm2eth0")],
     {("KvmnetProbingStopped", "h8")}),
    ("a guest shut off on purpose does not page as lost",
     [alert("KvmnetGuestStopped", "info", instance="h7", **NS, guest="vm1", state="shutoff"),
      alert("KvmnetTapRemoved", "warning", instance="h7", **NS, bridge="br0", device="vm1eth0", guest="vm1"),
      alert("KvmnetGuestDown", "critical", instance="h7", **NS, guest="vm1", bridge="br0", device="vm1eth0")],
     {("KvmnetGuestStopped", "h7", "vm1")}),
]


def key(labels: dict) -> tuple:
    """(alertname, instance, guest) for guest-level alerts, (alertname, instance) for the others."""
    k = (labels["alertname"], labels["instance"])
    return k if labels["alertname"] in ("KvmnetBridgeDown", "KvmnetExporterDown", "KvmnetProbingStopped") \
        else k + (labels.get("guest", ""),)


def matches(labels: dict, want: set) -> bool:
    return key(labels) in want


@pytest.fixture(scope="module")
def am(tmp_path_factory):
    if ALERTMANAGER is None:
        pytest.fail("prometheus-alertmanager missing: scripts/bootstrap.sh installs it")
    tmp = tmp_path_factory.mktemp("am")
    rec = Recorder()
    am = Alertmanager(tmp, am_test_config(rec.url))
    try:
        yield am, rec
    finally:
        am.stop()
        rec.stop()


def test_inhibitions_and_grouping(am):
    am, rec = am
    # Sources first, as they fire first in Prometheus (the tap alert's 30s before GuestDown's 1m, the exporter's
    # `up` before anything else); the consequences a second later, once Alertmanager's inhibitor holds the sources.
    am.post([alerts[0] for _, alerts, _ in SCENARIOS])
    time.sleep(1)
    am.post([a for _, alerts, _ in SCENARIOS for a in alerts[1:]])

    def problems() -> list[str]:
        state = {tuple(sorted(a["labels"].items())): a["status"] for a in am.alerts()}
        out = []
        for name, alerts, want in SCENARIOS:
            for a in alerts:
                st = state.get(tuple(sorted(a["labels"].items())))
                active = st is not None and not st["inhibitedBy"]
                if st is None or active != matches(a["labels"], want):
                    out.append(f"{name}: {a['labels']['alertname']} {a['labels']}: "
                               f"{'missing' if st is None else 'active' if active else 'inhibited'}")
        return out
    want_all = {k for _, _, want in SCENARIOS for k in want}
    deadline = time.monotonic() + 20   # group_wait is 1s in the test copy; a loaded machine is slower
    while (problems() or len(rec.notifications()) < len(want_all)) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # and nothing more arrives
    assert not problems(), "\n".join(problems())

    # What was notified: exactly the active alerts, one notification per group, to the receiver by severity.
    notes = rec.notifications()
    notified = [(n[1], a["labels"]) for n in notes for a in firing_alerts(n[2])]
    got = [key(l) for _, l in notified]
    assert sorted(got) == sorted(want_all), (got, want_all)
    for receiver, labels in notified:
        expect = {"critical": "kvmnet-page", "warning": "kvmnet-ticket", "info": "kvmnet-info"}[labels["severity"]]
        assert receiver == expect, (receiver, labels)
    groups = [n[2]["groupKey"] for n in notes]
    assert len(groups) == len(set(groups)), "a group notified twice"
    # h2's two active alerts are in different groups (the bridge's, and guest vm9's); h4's too (vm1, vm2).
    assert len(notes) == len(want_all)
