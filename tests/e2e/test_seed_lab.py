"""The seed's experiment end to end with real QEMU guests (TCG here): the LAN peer pings vm1 through br0, vm1's MAC
is learned on vm1eth0, `up` again changes nothing, `down` leaves no namespace, tap or QEMU. Namespaces renamed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests import witness
from tests.netns.setup_labs import RUN_DIR, Labs, cli, netns_list

pytestmark = pytest.mark.qemu


def qemu_pids(lab: str) -> list[int]:
    """QEMU processes whose command line names this lab's run directory (never kvmnet code)."""
    mark = str(RUN_DIR / lab).encode()
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if b"qemu-system" in cmd and mark in cmd:
                out.append(int(pid))
    return out


@pytest.fixture
def labs(tmp_path):
    l = Labs(tmp_path)
    yield l
    l.cleanup()
    for name in l.names:  # belt and braces: no QEMU outlives its test
        for pid in qemu_pids(name):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def wait_ping(netns: str, ip: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if witness.run(netns, "ping", "-c1", "-W1", ip, check=False).returncode == 0:
            return time.monotonic() - start
    raise AssertionError(f"{ip} did not answer from {netns} within {timeout:.0f}s")


def test_seed_experiment(labs):
    path, d = labs.seed()
    host, lan = d["namespaces"]["host"], d["namespaces"]["lan"]
    t0 = time.monotonic()
    cli("up", "-c", str(path), check=True, timeout=600)
    pids = sorted(qemu_pids(d["name"]))
    assert len(pids) == 2, pids
    # The seed's experiment: the LAN peer reaches the guest through eth1 -> br0 -> vm1eth0.
    wait_ping(lan, "192.168.98.11", 120)
    boot = time.monotonic() - t0
    wait_ping(lan, "192.168.98.12", 60)
    print(f"seed lab: up + vm1 answering ping in {boot:.1f}s")

    # kvmnet-ifup put the taps on br0 (QEMU ran it); vm1's MAC is learned on vm1eth0.
    ports = witness.bridge_ports(host)
    assert ports["vm1eth0"]["master"] == "br0" and ports["vm2eth0"]["master"] == "br0"
    assert ports["eth1"]["master"] == "br0"
    fdb = witness.fdb(host)
    assert any(e["mac"] == "0a:e8:4f:c5:6a:16" and e["ifname"] == "vm1eth0" and "permanent" not in e.get("state", "")
               for e in fdb), fdb
    assert "LOWER_UP" in witness.links(host)["vm1eth0"]["flags"]   # QEMU holds the tap: carrier

    again = json.loads(cli("up", "-c", str(path), "--json", check=True).stdout)
    assert again["changed"] == 0
    assert sorted(qemu_pids(d["name"])) == pids                      # no duplicate QEMU

    st = json.loads(cli("status", "-c", str(path), "--json", check=True).stdout)
    assert {g["name"]: g["running"] for g in st["guests"]} == {"vm1": True, "vm2": True}

    cli("down", "-c", str(path), check=True, timeout=120)
    assert not {host, lan} & netns_list()
    assert qemu_pids(d["name"]) == []
    root = {l["ifname"] for l in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True,
                                                            text=True).stdout)}
    assert not {"vm1eth0", "vm2eth0"} & root
    assert not (RUN_DIR / d["name"]).exists()


def test_qemu_refusing_to_start_rolls_back(labs):
    path, d = labs.seed()
    # QEMU refuses a qcow2 it cannot read ("Unsupported qcow2 version 0"); vm1, started first, must go. (An absurd
    # memory: size no longer reaches QEMU: the lab file bounds it.)
    bad = path.parent / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(508))
    d["guests"][1]["image"] = str(bad)
    labs.write(d, path)
    p = cli("up", "-c", str(path), timeout=600)
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr
    assert "start QEMU guest vm2" in lines[-1] and "rolled back" in lines[-1], p.stderr
    assert not {d["namespaces"]["host"], d["namespaces"]["lan"]} & netns_list()
    assert qemu_pids(d["name"]) == []
    assert not (RUN_DIR / d["name"]).exists()


def test_kill_9_after_qemu_started_down_still_stops_it(labs):
    """`up` killed once QEMU runs but before its pid is recorded: the record already names the pidfile, which is on
    QEMU's command line, so `down` finds and stops it; the next `up` does not start a second one."""
    path, d = labs.seed()
    d["guests"] = d["guests"][:1]
    labs.write(d, path)
    env = dict(os.environ, KVMNET_TEST_HOOK="kill-made:guest:vm1")
    p = subprocess.run([sys.executable, "-m", "kvmnet.setup.cli", "up", "-c", str(path), "--wait", "0"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr
    pids = qemu_pids(d["name"])
    assert len(pids) == 1, pids
    again = json.loads(cli("up", "-c", str(path), "--json", "--wait", "0", check=True, timeout=600).stdout)
    assert "guest_start" not in [a["op"] for a in again["actions"]] and qemu_pids(d["name"]) == pids
    cli("down", "-c", str(path), check=True, timeout=120)
    assert qemu_pids(d["name"]) == []
    assert not {d["namespaces"]["host"], d["namespaces"]["lan"]} & netns_list()
    assert not (RUN_DIR / d["name"]).exists()
