"""Proxmox VE's shape (tests/e2e/proxmox_host.py): web01 (VMID 100) behind the guest firewall (tap100i0 on
fwbr100i0, fwln100i0 <-> fwpr100p0 on vmbr0), db01 (VMID 101) on vmbr0 directly, both real QEMU run as `kvm` with
PVE's argv. `kvmnet-exporter --netns NS` with no config must show web01 on its tap, fw ports and fw bridge, ping
both (web01 through the fw chain), not give db01's flooded MAC to web01, and report web01 down within 5 s of its
QEMU's death although the fw veths keep carrier. Witnesses: iproute2, bridge fdb, ping.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.e2e.proxmox_host import ProxmoxHost, mac_of
from tests.netns.test_exporter_cli import Exporter, samples, value

pytestmark = pytest.mark.qemu


def wait(e: Exporter, what: str, cond, timeout: float = 30.0) -> tuple[str, float]:
    t0 = time.monotonic()
    while True:
        text = e.metrics()
        if cond(text):
            return text, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            lines = [l for l in text.splitlines() if l.startswith(("kvmnet_guest_", "kvmnet_port_info",
                                                                      "kvmnet_bridge_info"))]
            raise AssertionError(f"{what}: not within {timeout} s\n" + "\n".join(lines))
        time.sleep(0.2)


def info(text: str, ns: str, name: str = "kvmnet_port_info") -> dict[str, dict]:
    key = "bridge" if name == "kvmnet_bridge_info" else "device"
    return {s.labels[key]: s.labels for s in samples(text) if s.name == name and s.labels["netns"] == ns}


@pytest.fixture(scope="module")
def pve():
    with ProxmoxHost("kv") as h:
        h.guest(100, "web01", "10.1.0.100", firewall=True)
        h.guest(101, "db01", "10.1.0.101")
        e = Exporter("--netns", h.ns)
        try:
            yield h, e
        finally:
            print(e.stop()[-2000:])


def test_web01_named_on_its_tap_fw_ports_and_fw_bridge(pve):
    h, e = pve
    text, _ = wait(e, "names", lambda t: info(t, h.ns).get("tap100i0", {}).get("guest") == "web01"
                   and info(t, h.ns).get("tap101i0", {}).get("guest") == "db01")
    ports = info(text, h.ns)
    links = {l["ifname"]: l for l in json.loads(subprocess.run(["ip", "-n", h.ns, "-j", "link"], check=True,
                                                                 capture_output=True, text=True).stdout)}
    assert links["tap100i0"]["master"] == "fwbr100i0" and links["fwln100i0"]["master"] == "fwbr100i0"
    assert links["fwpr100p0"]["master"] == "vmbr0" and links["tap101i0"]["master"] == "vmbr0"
    for dev in ("tap100i0", "fwln100i0", "fwpr100p0"):
        assert ports[dev]["guest"] == "web01", (dev, ports[dev])
    assert ports["tap100i0"]["mac"] == links["tap100i0"]["address"]
    bridges = info(text, h.ns, "kvmnet_bridge_info")
    assert bridges["fwbr100i0"]["guest"] == "web01" and bridges["vmbr0"]["guest"] == ""
    # one guest on the dashboards: every series naming web01 is on its own devices
    assert {d for d, l in ports.items() if l["guest"] == "web01"} == {"tap100i0", "fwln100i0", "fwpr100p0"}
    # QMP (PVE's -chardev socket -mon mode=control) gives the run state
    text, _ = wait(e, "state", lambda t: value(t, "kvmnet_guest_state", netns=h.ns, guest="web01",
                                              state="running") == 1, timeout=10)


def test_both_pinged_web01_through_the_fw_chain_and_no_flooded_mac_taken(pve):
    h, e = pve
    h.wait_ping("10.1.0.100")
    h.wait_ping("10.1.0.101")
    text, _ = wait(e, "both up", lambda t: value(t, "kvmnet_guest_up", netns=h.ns, guest="web01") == 1
                   and value(t, "kvmnet_guest_up", netns=h.ns, guest="db01") == 1, timeout=30)
    gi = {s.labels["guest"]: s.labels for s in samples(text) if s.name == "kvmnet_guest_info"
          and s.labels["netns"] == h.ns}
    assert set(gi) == {"web01", "db01"}, gi
    assert (gi["web01"]["address"], gi["web01"]["mac"], gi["web01"]["device"], gi["web01"]["bridge"]) == \
        ("10.1.0.100", mac_of(100), "tap100i0", "fwbr100i0")
    assert (gi["db01"]["address"], gi["db01"]["device"]) == ("10.1.0.101", "tap101i0")
    # db01's MAC is learned on web01's fw ports (flooded through the chain), and must not make a guest of them
    fdb = json.loads(subprocess.run(["bridge", "-n", h.ns, "-j", "fdb", "show"], check=True, capture_output=True,
                                    text=True).stdout)
    on_fwln = {f["mac"] for f in fdb if f.get("ifname") == "fwln100i0" and "permanent" not in f.get("state", "")}
    assert mac_of(101) in on_fwln, on_fwln


def test_web01_qemu_killed_down_within_5s_while_fw_veths_keep_carrier(pve):
    h, e = pve
    wait(e, "web01 up", lambda t: value(t, "kvmnet_guest_up", netns=h.ns, guest="web01") == 1)
    h.kill(100)
    text, took = wait(e, "web01 down", lambda t: value(t, "kvmnet_guest_up", netns=h.ns, guest="web01") == 0,
                      timeout=10)
    print(f"web01 QEMU SIGKILL -> kvmnet_guest_up 0 in {took:.1f} s")
    assert took <= 5.0
    links = {l["ifname"]: l for l in json.loads(subprocess.run(["ip", "-n", h.ns, "-j", "link"], check=True,
                                                                 capture_output=True, text=True).stdout)}
    assert "tap100i0" not in links  # QEMU made it: gone with QEMU
    for dev in ("fwln100i0", "fwpr100p0"):
        assert "LOWER_UP" in links[dev]["flags"]
        assert value(text, "kvmnet_port_up", netns=h.ns, device=dev) == 1
    assert value(text, "kvmnet_guest_up", netns=h.ns, guest="db01") == 1  # only web01 went down
    text, _ = wait(e, "guest_info follows its device", lambda t: any(
        s.name == "kvmnet_guest_info" and s.labels["guest"] == "web01" and s.labels["device"] == ""
        for s in samples(t)), timeout=10)
