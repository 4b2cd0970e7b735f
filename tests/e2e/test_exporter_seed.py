"""The seed lab with real QEMU guests, as a new user runs it: `kvmnet-exporter --netns <host>` with no config and
no lab shows br0, its ports with guest="vm1" on vm1eth0 (found from the running QEMU, nothing configured), FDB
counts and STP states, each checked against iproute2. Namespaces are renamed (never the demo's seed-host)."""
import subprocess
import time

import pytest

from kvmnet.setup.qemu import QMP
from tests import witness
from tests.harness import Exporter, samples, value
from tests.netns.setup_labs import Labs, cli

pytestmark = pytest.mark.qemu
STP_STATES = ("disabled", "listening", "learning", "forwarding", "blocking")


def fdb_type(state: str) -> str:
    return {"permanent": "local", "static": "static"}.get(state, "learned")


def qmp_path(guest: str, netns: str) -> str:
    """The QMP socket of a running QEMU guest in a namespace, from /proc (the witness reads /proc itself)."""
    import os
    want = os.stat(f"/run/netns/{netns}").st_ino
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if "qemu-system" in argv[0] and ino == want and "-qmp" in argv and "-name" in argv \
                and argv[argv.index("-name") + 1] == guest:
            return argv[argv.index("-qmp") + 1].split(",")[0].removeprefix("unix:")
    raise AssertionError(f"no QEMU for {guest} in {netns}")


def port_labels(text: str, netns: str, name: str) -> dict[str, dict]:
    return {s.labels["device"]: s.labels for s in samples(text) if s.name == name and s.labels["netns"] == netns}


@pytest.fixture
def labs(tmp_path):
    l = Labs(tmp_path)
    yield l
    l.cleanup()


def test_seed_lab_no_config(labs):
    path, lab = labs.seed()
    host = lab["namespaces"]["host"]
    cli("up", "-c", str(path), check=True, timeout=600)
    e = Exporter("--netns", host, log_dir=labs.tmp)
    try:
        # Guest names come from /proc (the identity scan refreshes every few seconds).
        deadline = time.monotonic() + 60
        while True:
            text = e.metrics()
            info = port_labels(text, host, "kvmnet_port_info")
            if info.get("vm1eth0", {}).get("guest") == "vm1" and info.get("vm2eth0", {}).get("guest") == "vm2":
                break
            assert time.monotonic() < deadline, f"no guest names: {info}"
            time.sleep(1)
        assert value(text, "kvmnet_scrape_collector_success", collector="bridge", netns=host) == 1
        assert value(text, "kvmnet_scrape_collector_success", collector="fdb", netns=host) == 1

        links = witness.links(host)
        ports = {n for n, l in links.items() if l.get("master") == "br0"}
        assert ports == {"eth1", "vm1eth0", "vm2eth0"}
        assert value(text, "kvmnet_bridge_ports", netns=host, bridge="br0") == 3
        assert set(info) == ports
        assert info["eth1"]["guest"] == ""
        assert info["vm1eth0"]["kind"] == "tap" and info["vm1eth0"]["mac"] == links["vm1eth0"]["address"]
        for dev in ports:  # QEMU holds both taps: carrier up
            assert value(text, "kvmnet_port_up", netns=host, bridge="br0", device=dev) == \
                (1 if "LOWER_UP" in links[dev]["flags"] else 0)
        assert value(text, "kvmnet_port_up", netns=host, bridge="br0", device="vm1eth0") == 1

        # STP state per port, as `bridge -j link` says
        bports = witness.bridge_ports(host)
        for dev in ports:
            for s in STP_STATES:
                assert value(text, "kvmnet_port_stp_state", netns=host, device=dev, state=s) == \
                    (1 if bports[dev]["state"] == s else 0), (dev, s)

        # Traffic to the guest from the host side, so MACs get learned; then FDB counts per port and type,
        # compared with `bridge -j fdb` (learned entries can change between the two reads: retry until equal).
        deadline = time.monotonic() + 120
        while witness.run(host, "ping", "-c", "1", "-W", "1", "192.168.98.11", check=False).returncode != 0:
            assert time.monotonic() < deadline, "vm1 never answered ping"
        deadline = time.monotonic() + 30
        while True:
            before = witness.fdb(host)
            text = e.metrics()
            after = witness.fdb(host)
            if before == after:
                break
            assert time.monotonic() < deadline
        for dev in ports:
            for t in ("local", "static", "learned"):
                want = sum(1 for f in after if f.get("master") == "br0" and f["ifname"] == dev
                           and fdb_type(f.get("state", "")) == t)
                assert value(text, "kvmnet_port_fdb_entries", netns=host, bridge="br0", device=dev, type=t) == want, \
                    (dev, t)
        assert value(text, "kvmnet_port_fdb_entries", netns=host, device="vm1eth0", type="learned") >= 1

        # With no config, the prober discovers vm1 from the learned MAC and the neighbour entry and pings it.
        deadline = time.monotonic() + 60
        while value(text, "kvmnet_guest_up", netns=host, guest="vm1") != 1:
            assert time.monotonic() < deadline, "kvmnet_guest_up{guest=vm1} never 1"
            time.sleep(1)
            text = e.metrics()
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr

        # Run state from QMP (kvmnet-setup starts QEMU with -qmp unix:...): running; QMP stop -> paused within 5 s
        # and cont -> running, as QEMU itself says (query-status is the witness).
        def state(guest: str) -> str | None:
            return next((s.labels["state"] for s in samples(e.metrics()) if s.name == "kvmnet_guest_state"
                         and s.labels["guest"] == guest and s.labels["netns"] == host and s.value == 1), None)

        def wait_state(guest: str, want: str, timeout: float = 5.0) -> None:
            deadline = time.monotonic() + timeout
            while state(guest) != want:
                assert time.monotonic() < deadline, f"{guest}: kvmnet_guest_state not {want} (is {state(guest)})"
                time.sleep(0.2)

        wait_state("vm1", "running", 10)
        sock = qmp_path("vm1", host)
        with QMP(sock) as q:
            q.execute("stop")
            assert q.execute("query-status")["status"] == "paused"
        wait_state("vm1", "paused")
        with QMP(sock) as q:
            q.execute("cont")
        wait_state("vm1", "running")
    finally:
        err = e.stop()
        assert "Traceback" not in err, err

    # With --lab instead: the lab's host namespace is watched and both guests are probe targets from the start
    # (vm2 was never pinged above, so discovery alone would not know its address).
    e = Exporter("--lab", str(path), log_dir=labs.tmp)
    try:
        deadline = time.monotonic() + 60
        while True:
            text = e.metrics()
            if all(value(text, "kvmnet_guest_up", netns=host, guest=g) == 1 for g in ("vm1", "vm2")):
                break
            assert time.monotonic() < deadline, "lab guests never up"
            time.sleep(1)
        info = {s.labels["guest"]: s.labels for s in samples(text) if s.name == "kvmnet_guest_info"}
        assert info["vm2"]["address"] == "192.168.98.12" and info["vm2"]["device"] == "vm2eth0"
        assert info["vm2"]["mac"] == "0a:e8:4f:c5:6a:17" and info["vm2"]["bridge"] == "br0"
        assert port_labels(text, host, "kvmnet_port_info")["vm2eth0"]["guest"] == "vm2"
    finally:
        err = e.stop()
        assert "Traceback" not in err, err
