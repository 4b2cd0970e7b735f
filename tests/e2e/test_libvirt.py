"""A real libvirt (Debian's libvirtd 9.0, in a namespace of its own: tests/e2e/libvirt_host.py) with three tiny
guests, one per interface type, watched by `kvmnet-exporter --netns NS` with no config:

    kvbr    <interface type='bridge'>  vnetN on the plain bridge kvbr0           10.77.0.11 (static)
    kvnat   <interface type='network'> vnetN on libvirt's NAT network kvvirbr1   DHCP from libvirt's dnsmasq
    kvdir   <interface type='direct'>  macvtap on kvlow0 (a veth to a peer namespace); the host reaches it
                                       through kvmv0, a macvlan sibling in bridge mode on the same lower device

Checked against the witnesses (iproute2, virsh domifstat, virsh domstate, ping), never kvmnet's code: names, counters,
carrier, kvmnet_guest_state and kvmnet_guest_up, through suspend, resume, destroy, start and reboot. Each lifecycle
step's time to show in /metrics is printed (run with -s) and written to bench/results/libvirt_lifecycle.md.

One libvirtd and three guests for the whole module (2 cores): the tests run in order and share them.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.libvirt_host import LibvirtHost
from tests.netns.test_exporter_cli import Exporter, samples, value

pytestmark = [pytest.mark.qemu, pytest.mark.skipif(subprocess.run(["which", "libvirtd"], capture_output=True)
                                                   .returncode != 0, reason="libvirtd is not installed")]

MAC = {"kvbr": "52:54:00:77:00:11", "kvnat": "52:54:00:78:00:12", "kvdir": "52:54:00:79:00:13"}
ADDR = {"kvbr": "10.77.0.11", "kvdir": "10.79.0.13"}
TIMES: dict[str, float] = {}
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "libvirt_lifecycle.md"


def links(ns: str) -> dict[str, dict]:
    out = subprocess.run(["ip", "-n", ns, "-s", "-d", "-j", "link", "show"], check=True, capture_output=True,
                         text=True).stdout
    return {l["ifname"]: l for l in json.loads(out)}


class Env:
    def __init__(self, h: LibvirtHost, e: Exporter) -> None:
        self.h, self.e = h, e

    def metrics(self) -> str:
        return self.e.metrics()

    def wait(self, what: str, cond, timeout: float = 30.0, step: float = 0.2) -> float:
        """Seconds until cond(metrics text) is true; fails with the last scrape's relevant lines."""
        t0 = time.monotonic()
        while True:
            text = self.metrics()
            if cond(text):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                lines = [l for l in text.splitlines() if l.startswith(("kvmnet_guest_", "kvmnet_port_info"))]
                raise AssertionError(f"{what}: not within {timeout} s\n" + "\n".join(lines))
            time.sleep(step)

    def state(self, text: str, guest: str) -> str | None:
        for s in samples(text):
            if s.name == "kvmnet_guest_state" and s.labels["guest"] == guest and s.labels["netns"] == self.h.ns \
                    and s.value == 1:
                return s.labels["state"]
        return None

    def up(self, text: str, guest: str) -> float | None:
        return value(text, "kvmnet_guest_up", netns=self.h.ns, guest=guest)

    def port(self, text: str, guest: str) -> dict | None:
        for s in samples(text):
            if s.name == "kvmnet_port_info" and s.labels["guest"] == guest and s.labels["netns"] == self.h.ns:
                return s.labels
        return None


@pytest.fixture(scope="module")
def env():
    with LibvirtHost("kv") as h:
        h.bridge("kvbr0", "10.77.0.1/24")
        h.nat_network("kvnatnet", "kvvirbr1", "10.78.0.1/24")
        h.direct_lower("kvlow0", "10.79.0.2/24")
        h.sibling("kvmv0", "kvlow0", "10.79.0.1/24")
        h.define("kvbr", h.iface_bridge("kvbr0", MAC["kvbr"]), ip="10.77.0.11/24")
        h.define("kvnat", h.iface_network("kvnatnet", MAC["kvnat"]))
        h.define("kvdir", h.iface_direct("kvlow0", MAC["kvdir"]), ip="10.79.0.13/24")
        e = Exporter("--netns", h.ns)
        try:
            for d in MAC:
                h.virsh("start", d)
            yield Env(h, e)
        finally:
            err = e.stop()
            print(err[-3000:])
            if TIMES:
                RESULTS.parent.mkdir(exist_ok=True)
                RESULTS.write_text("# libvirt lifecycle: time until /metrics shows it (tests/e2e/test_libvirt.py)\n\n"
                                   "| step | seconds |\n|---|---|\n"
                                   + "".join(f"| {k} | {v:.1f} |\n" for k, v in TIMES.items()))
            print("lifecycle times:", {k: round(v, 1) for k, v in TIMES.items()})


def test_names_kinds_and_state_of_all_three_interface_types(env):
    h = env.h
    # The host pings the static guests (as any host talking to its guests would: that makes the neighbour
    # entries discovery joins); the NAT guest is found from libvirt's DHCP lease alone.
    h.wait_ping(ADDR["kvbr"])
    h.wait_ping(ADDR["kvdir"])
    env.wait("names on kvmnet_port_info", lambda t: all(env.port(t, g) for g in MAC))
    text = env.metrics()
    devs = {g: h.domifaddr_dev(g) for g in MAC}
    lk = links(h.ns)
    for g in MAC:
        p = env.port(text, g)
        assert [p["device"]] == devs[g], (g, p, devs[g])
        assert p["mac"] == lk[p["device"]]["address"]
    assert env.port(text, "kvbr")["bridge"] == "kvbr0" and env.port(text, "kvbr")["kind"] == "tap"
    assert env.port(text, "kvnat")["bridge"] == "kvvirbr1"
    d = env.port(text, "kvdir")
    assert (d["bridge"], d["kind"], d["lower"]) == ("", "macvtap", "kvlow0")
    assert lk[d["device"]]["linkinfo"]["info_kind"] == "macvtap"
    for g in MAC:
        assert env.state(text, g) == "running" == h.virsh("domstate", g).strip()
        assert value(text, "kvmnet_port_up", netns=h.ns, device=env.port(text, g)["device"]) == 1
        assert "LOWER_UP" in lk[env.port(text, g)["device"]]["flags"]


def test_every_guest_probed_up_nat_one_from_its_lease(env):
    h = env.h
    lease = None
    deadline = time.monotonic() + 60
    while lease is None:
        lease = next((l for l in h.leases("kvvirbr1") if l["mac-address"] == MAC["kvnat"]), None)
        assert time.monotonic() < deadline, f"no DHCP lease: {h.console('kvnat')}"
        time.sleep(0.5)
    env.wait("all three up", lambda t: all(env.up(t, g) == 1 for g in MAC), timeout=60)
    text = env.metrics()
    info = {s.labels["guest"]: s.labels for s in samples(text) if s.name == "kvmnet_guest_info"}
    assert info["kvnat"]["address"] == lease["ip-address"]
    assert info["kvdir"]["address"] == ADDR["kvdir"] and info["kvdir"]["device"].startswith("macvtap")
    assert info["kvbr"]["bridge"] == "kvbr0"


def test_counters_equal_iproute2_and_virsh_in_the_right_direction(env):
    """Host's view as iproute2 gives it. virsh domifstat is the guest's view: swapped for a tap, as-is for a
    macvtap (its receive is already toward the guest)."""
    h = env.h
    fields = [("receive", "bytes", "rx", "bytes"), ("transmit", "bytes", "tx", "bytes"),
              ("receive", "packets", "rx", "packets"), ("transmit", "packets", "tx", "packets")]
    for g in MAC:
        dev = env.port(env.metrics(), g)["device"]
        for _ in range(20):  # counters move with the probes: read witness, exporter, witness until stable
            before = links(h.ns)[dev]["stats64"]
            vstat = h.domifstat(g, dev)
            text = env.metrics()
            after = links(h.ns)[dev]["stats64"]
            if before == after:
                break
        for direction, unit, k, u in fields:
            got = value(text, f"kvmnet_port_{direction}_{unit}_total", netns=h.ns, device=dev)
            assert got == after[k][u], (g, dev, direction, unit)
        if env.port(text, g)["kind"] == "macvtap":
            guest_rx, guest_tx = after["rx"]["bytes"], after["tx"]["bytes"]
        else:
            guest_rx, guest_tx = after["tx"]["bytes"], after["rx"]["bytes"]
        # virsh read between the two witnesses: within a few probe packets of them
        assert abs(vstat["rx_bytes"] - guest_rx) < 2000 and abs(vstat["tx_bytes"] - guest_tx) < 2000, (g, vstat)


@pytest.mark.parametrize("guest", ["kvbr", "kvdir"])
def test_suspend_resume(env, guest):
    h = env.h
    h.virsh("suspend", guest)
    TIMES[f"{guest}: suspend -> state paused"] = env.wait(
        "paused", lambda t: env.state(t, guest) == "paused", timeout=5)
    assert h.virsh("domstate", guest).strip() == "paused"
    TIMES[f"{guest}: suspend -> guest_up 0"] = env.wait("down while paused", lambda t: env.up(t, guest) == 0)
    text = env.metrics()
    dev = env.port(text, guest)["device"]
    # A paused guest's tap keeps carrier (QEMU holds it); libvirt takes a paused guest's macvtap down. The
    # witness decides; the alert rules suppress both while the state says paused.
    carrier = 1 if "LOWER_UP" in links(h.ns)[dev]["flags"] else 0
    assert value(text, "kvmnet_port_up", netns=h.ns, device=dev) == carrier
    print(f"{guest}: paused: carrier {carrier}")
    h.virsh("resume", guest)
    TIMES[f"{guest}: resume -> state running"] = env.wait(
        "running", lambda t: env.state(t, guest) == "running", timeout=5)
    TIMES[f"{guest}: resume -> guest_up 1"] = env.wait("up", lambda t: env.up(t, guest) == 1)


@pytest.mark.parametrize("guest", ["kvbr", "kvdir"])
def test_destroy_start(env, guest):
    h = env.h
    dev = env.port(env.metrics(), guest)["device"]
    h.virsh("destroy", guest)
    TIMES[f"{guest}: destroy -> state shutoff"] = env.wait(
        "shutoff", lambda t: env.state(t, guest) == "shutoff", timeout=5)
    TIMES[f"{guest}: destroy -> guest_up 0"] = env.wait("down", lambda t: env.up(t, guest) == 0, timeout=10)
    assert dev not in links(h.ns)  # libvirt removed the tap / macvtap
    text = env.wait("no port series for the deleted device",
                    lambda t: f'device="{dev}"' not in t.split("kvmnet_guest_info")[0] and env.port(t, guest) is None)
    info = [s.labels for s in samples(env.metrics()) if s.name == "kvmnet_guest_info" and s.labels["guest"] == guest]
    assert info and info[0]["device"] == ""  # guest_info follows its device: it points at no deleted tap
    t0 = time.monotonic()
    h.virsh("start", guest)
    env.wait("running", lambda t: env.state(t, guest) == "running", timeout=5)
    TIMES[f"{guest}: start -> state running"] = time.monotonic() - t0
    env.wait("named port", lambda t: env.port(t, guest) is not None, timeout=10)
    TIMES[f"{guest}: start -> port named"] = time.monotonic() - t0
    h.wait_ping(ADDR[guest])  # the guest boots (TCG: seconds); the host talks to it again
    env.wait("up", lambda t: env.up(t, guest) == 1, timeout=60)
    TIMES[f"{guest}: start -> guest_up 1 (boot included)"] = time.monotonic() - t0
    text = env.metrics()
    names = [s.labels["guest"] for s in samples(text) if s.name == "kvmnet_guest_up" and s.labels["netns"] == h.ns]
    assert sorted(names) == sorted(set(names)), names  # one series per guest: no leftover under a tap name
    assert not any(n.startswith(("vnet", "macvtap")) for n in names), names


def test_reboot(env):
    h = env.h
    guest = "kvbr"
    t0 = time.monotonic()
    h.virsh("reboot", guest)
    # The tiny guest powers off on the ACPI button; libvirt's reboot then restarts it (on_reboot=restart)
    # with the same tap, so the guest is briefly unreachable and comes back.
    try:
        env.wait("down during reboot", lambda t: env.up(t, guest) == 0, timeout=15)
        TIMES[f"{guest}: reboot -> guest_up 0"] = time.monotonic() - t0
    except AssertionError:
        pass  # a reboot faster than the 3 lost probes down_after needs: nothing to see, which is fine
    h.wait_ping(ADDR[guest])
    env.wait("up after reboot", lambda t: env.up(t, guest) == 1 and env.state(t, guest) == "running", timeout=60)
    TIMES[f"{guest}: reboot -> guest_up 1"] = time.monotonic() - t0


def test_qemu_killed_is_crashed_not_shutoff(env):
    """A QEMU that dies under libvirt (SIGKILL) is not a stop on purpose: state crashed, so its loss pages."""
    import os
    import signal

    from tests.e2e.libvirt_host import qemu_pid
    h = env.h
    guest = "kvnat"
    env.wait("kvnat up", lambda t: env.up(t, guest) == 1, timeout=30)
    pid = qemu_pid(h, guest)
    assert pid
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    env.wait("crashed", lambda t: env.state(t, guest) == "crashed", timeout=5)
    TIMES[f"{guest}: QEMU SIGKILL -> state crashed"] = time.monotonic() - t0
    env.wait("down", lambda t: env.up(t, guest) == 0, timeout=10)
    TIMES[f"{guest}: QEMU SIGKILL -> guest_up 0"] = time.monotonic() - t0
    assert "shut off" in h.virsh("domstate", guest) and "crashed" in h.virsh("domstate", "--reason", guest)
