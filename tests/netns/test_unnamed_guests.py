"""Issue 9's identity rules with QEMU-like processes (tests/e2e/tap_guest.py: it opens its tap as QEMU does and
answers ARP and ping; its /proc cmdline reads like QEMU's):

- two guests started as in the seed, with no -name, on one bridge: each is named after its tap, both probed;
  kill one and only it goes down, within 5 s;
- a guest whose QEMU appears while the exporter runs is named within a few seconds of its tap appearing, and its
  series carry that name with no leftover under the tap's name;
- kvmnet_guest_info follows its device: once the tap is gone, it points at none.
Witnesses: ping and iproute2.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.test_exporter_cli import Exporter, samples, value

pytestmark = pytest.mark.netns
TAP_GUEST = Path(__file__).resolve().parents[1] / "e2e" / "tap_guest.py"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def host(netns_factory, tmp_path):
    ns = netns_factory("kvu")
    sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", ns, "addr", "add", "10.88.0.1/24", "dev", "br0")
    sh("ip", "-n", ns, "link", "set", "br0", "up")
    exe = tmp_path / "qemu-system-x86_64"
    exe.symlink_to(os.path.realpath(sys.executable))
    procs: list[subprocess.Popen] = []

    def guest(tap: str, addr: str, mac: str, name: str | None = None) -> subprocess.Popen:
        argv = ["ip", "netns", "exec", ns, str(exe), str(TAP_GUEST), tap, addr, mac]
        argv += ["-name", name] if name else []
        argv += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        sh("ip", "-n", ns, "link", "set", tap, "master", "br0", "up")
        procs.append(p)
        return p

    yield ns, guest
    for p in procs:
        p.kill()
        p.wait()


def wait(e: Exporter, what: str, cond, timeout: float = 20.0) -> tuple[str, float]:
    t0 = time.monotonic()
    while True:
        text = e.metrics()
        if cond(text):
            return text, time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"{what}:\n" + "\n".join(
            l for l in text.splitlines() if l.startswith(("kvmnet_guest_up", "kvmnet_guest_info", "kvmnet_port_info")))
        time.sleep(0.1)


def guests_up(text: str, ns: str) -> dict[str, float]:
    return {s.labels["guest"]: s.value for s in samples(text) if s.name == "kvmnet_guest_up" and s.labels["netns"] == ns}


def test_two_unnamed_guests_probed_apart_and_only_the_killed_one_goes_down(host):
    ns, guest = host
    g1 = guest("kvt1", "10.88.0.11", "02:00:00:88:00:11")
    guest("kvt2", "10.88.0.12", "02:00:00:88:00:12")
    e = Exporter("--netns", ns)
    try:
        for addr in ("10.88.0.11", "10.88.0.12"):  # the host talks to its guests: neighbour entries
            subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", addr], check=True, capture_output=True)
        text, _ = wait(e, "both up", lambda t: guests_up(t, ns) == {"kvt1": 1, "kvt2": 1})
        info = {s.labels["device"]: s.labels["guest"] for s in samples(text)
                if s.name == "kvmnet_port_info" and s.labels["netns"] == ns}
        assert info == {"kvt1": "kvt1", "kvt2": "kvt2"}  # never "", never shared
        g1.kill()
        g1.wait()
        text, took = wait(e, "kvt1 down", lambda t: guests_up(t, ns).get("kvt1") == 0, timeout=10)
        assert took <= 5.0, took
        assert guests_up(text, ns) == {"kvt1": 0, "kvt2": 1}
        # its tap (QEMU-made, not persistent) is gone: guest_info follows it and names no device
        text, _ = wait(e, "info follows", lambda t: any(
            s.name == "kvmnet_guest_info" and s.labels["guest"] == "kvt1" and s.labels["device"] == ""
            for s in samples(t)), timeout=10)
    finally:
        e.stop()


def test_guest_started_while_running_is_named_at_once_with_no_leftover(host):
    ns, guest = host
    e = Exporter("--netns", ns)
    try:
        t0 = time.monotonic()
        guest("kvt3", "10.88.0.13", "02:00:00:88:00:13", name="web3")
        subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", "10.88.0.13"], check=True,
                       capture_output=True)
        text, _ = wait(e, "named and up", lambda t: guests_up(t, ns).get("web3") == 1)
        took = time.monotonic() - t0
        print(f"tap appeared -> guest web3 up under its name in {took:.1f} s")
        assert took < 5.0
        assert set(guests_up(text, ns)) == {"web3"}  # never a series under "kvt3"
        assert value(text, "kvmnet_port_info", netns=ns, device="kvt3", guest="web3") == 1
    finally:
        e.stop()
