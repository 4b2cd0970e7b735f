"""Bridge internals against independent witnesses, on real kernel objects: the FDB learning limit (by behaviour:
frames from more MACs than the limit, `bridge -j fdb show` counts), MAC moves (`bridge monitor fdb` running beside
the exporter), a shaped port's qdisc drops (`tc -s -j qdisc`) and an STP root change (sysfs root_id, `ip -d link`,
`ip stats ... xstats_slave`). Every other number goes through test_bridges_witness.assert_matches_witness."""
from __future__ import annotations

import logging
import socket
import subprocess
import time

import pytest

from kvmnet.common import netns as kvm_netns
from kvmnet.exporter.collectors.bridge import BridgeCollector
from kvmnet.exporter.collectors.fdb import FdbCollector
from kvmnet.exporter.sources.netlink import NetlinkSource
from tests import witness
from tests.netns.setup_labs import Labs, cli
from tests.netns.test_bridges_witness import assert_matches_witness, ipn, no_ipv6, rendered, value
from tests.netns.test_setup_lab import light_lab

pytestmark = pytest.mark.netns


def send_frames(netns: str, dev: str, macs: list[str], size: int = 60, gap: float = 0.0) -> None:
    """Broadcast frames of a local experimental ethertype from each source MAC, out of `dev` inside `netns`
    (AF_PACKET: what a guest emits, nothing of ours in between)."""
    with kvm_netns.entered(netns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        s.bind((dev, 0))
        for mac in macs:
            s.send(b"\xff" * 6 + bytes.fromhex(mac.replace(":", "")) + b"\x88\xb5" + bytes(size - 14))
            if gap:
                time.sleep(gap)
    finally:
        s.close()


def learned(netns: str, bridge: str) -> list[dict]:
    return [e for e in witness.fdb(netns) if e.get("master") == bridge and e.get("state", "") not in
            ("permanent", "static")]


def guest_pair(netns_factory):
    """A host namespace with bridge br0 (no STP) and two guest namespaces on veth ports p1, p2."""
    host, ga, gb = netns_factory("kb"), netns_factory("kg"), netns_factory("kg")
    for ns in (host, ga, gb):
        no_ipv6(ns)
    ipn(host, "link", "add", "br0", "type", "bridge", "stp_state", "0")
    for port, g in (("p1", ga), ("p2", gb)):
        ipn(host, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", g)
        ipn(host, "link", "set", port, "master", "br0", "up")
        ipn(g, "link", "set", "eth0", "up")
    ipn(host, "link", "set", "br0", "up")
    return host, ga, gb


@pytest.fixture
def labs(tmp_path):
    l = Labs(tmp_path)
    yield l
    l.cleanup()


def test_learning_limit_set_by_setup_holds_and_kvmnet_says_so(labs):
    lab = light_lab()
    lab["bridges"][0]["fdb_max_learned"] = 8
    f, d = labs.make(lab)
    cli("up", "-c", str(f), check=True)
    host, g1 = d["namespaces"]["host"], d["guests"][0]["netns"]
    source = NetlinkSource(host)
    fdb = FdbCollector(host, source=source)
    got = rendered([fdb])
    assert value(got, "kvmnet_bridge_fdb_learned_limit", netns=host, bridge="br0") == 8
    send_frames(g1, "eth0", [f"02:6b:62:00:00:{i:02x}" for i in range(20)])
    time.sleep(0.3)
    w = learned(host, "br0")
    assert len(w) == 8, w  # the kernel stopped at the limit: 20 MACs were offered
    got = rendered([fdb])
    assert value(got, "kvmnet_bridge_fdb_learned_entries", netns=host, bridge="br0") == 8
    assert value(got, "kvmnet_bridge_fdb_entries", netns=host, bridge="br0", type="learned") == 8
    per_port = {}
    for e in w:
        per_port[e["ifname"]] = per_port.get(e["ifname"], 0) + 1
    for port, n in per_port.items():
        assert value(got, "kvmnet_port_fdb_entries", netns=host, bridge="br0", device=port, type="learned") == n
    # Applying the same lab again finds nothing to do: the limit is read back with rtnetlink too.
    again = cli("up", "-c", str(f), check=True)
    assert "set bridge" not in again.stdout + again.stderr
    source.close()


def test_mac_moves_match_bridge_monitor(netns_factory, caplog):
    host, ga, gb = guest_pair(netns_factory)
    source = NetlinkSource(host)
    collectors = [BridgeCollector(host, source=source), FdbCollector(host, source=source)]
    rendered(collectors)  # subscribed: what follows arrives as events
    mon = subprocess.Popen(["bridge", "-n", host, "monitor", "fdb"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        mac = "02:6b:62:00:01:01"
        for _ in range(5):  # a cloned guest: the same MAC from both ports, in turn
            send_frames(ga, "eth0", [mac])
            time.sleep(0.05)
            send_frames(gb, "eth0", [mac])
            time.sleep(0.05)
        time.sleep(0.5)
        with caplog.at_level(logging.INFO, logger="kvmnet.netlink"):
            got = rendered(collectors, moves=True)
    finally:
        mon.terminate()
        out, _ = mon.communicate(timeout=5)
    # The witness: the sequence of ports `bridge monitor fdb` reported for the MAC; each change is one move onto
    # the new port.
    seq = [line.split()[2] for line in out.splitlines()
           if line.startswith(mac) and " master br0" in line and not line.startswith("Deleted")]
    onto = {"p1": 0, "p2": 0}
    for a, b in zip(seq, seq[1:]):
        if a != b:
            onto[b] += 1
    assert onto == {"p1": 4, "p2": 5}, seq
    for port, n in onto.items():
        assert value(got, "kvmnet_port_fdb_moves_total", netns=host, bridge="br0", device=port) == n
    assert f"mac={mac}" in caplog.text and "event=fdb_move" in caplog.text
    assert_matches_witness(host, collectors)
    source.close()


def test_shaped_port_drops_match_tc(netns_factory):
    host, ga, gb = guest_pair(netns_factory)
    # A per-guest rate limit on the port towards gb, as Proxmox and OpenStack put on a tap (no netem here: tbf).
    subprocess.run(["tc", "-n", host, "qdisc", "add", "dev", "p2", "root", "tbf", "rate", "100kbit", "burst",
                    "1600", "limit", "3000"], check=True)
    source = NetlinkSource(host)
    collectors = [BridgeCollector(host, source=source), FdbCollector(host, source=source)]
    rendered(collectors)
    send_frames(ga, "eth0", ["02:6b:62:00:02:01"] * 300, size=1000)  # flooded to p2: 300 kB at 100 kbit/s
    time.sleep(1.0)  # the backlog (3000 bytes at most) drains
    q = witness.root_qdiscs(host)["p2"]
    assert q["kind"] == "tbf" and q["drops"] > 200 and q["overlimits"] > 0, q
    got = assert_matches_witness(host, collectors)
    assert value(got, "kvmnet_port_qdisc_drops_total", netns=host, bridge="br0", device="p2") == q["drops"]
    source.close()


def test_stp_root_change_and_counters_match(netns_factory):
    host = netns_factory("kb")
    no_ipv6(host)
    for br in ("br0", "br1"):
        ipn(host, "link", "add", br, "type", "bridge", "stp_state", "1", "forward_delay", "200", "hello_time", "100")
    ipn(host, "link", "add", "l1a", "type", "veth", "peer", "name", "l1b")
    ipn(host, "link", "set", "l1a", "master", "br0", "up")
    ipn(host, "link", "set", "l1b", "master", "br1", "up")
    ipn(host, "link", "set", "br0", "up")
    ipn(host, "link", "set", "br1", "up")
    source = NetlinkSource(host)
    collectors = [BridgeCollector(host, source=source), FdbCollector(host, source=source)]
    # Whichever is root now, make the other one root: priority 0 beats the default 32768.
    time.sleep(3)
    root_before = witness.sysfs_bridge(host, "br0", "root_id")
    new_root = "br1" if root_before == witness.sysfs_bridge(host, "br0", "bridge_id") else "br0"
    other = "br0" if new_root == "br1" else "br1"
    ipn(host, "link", "set", new_root, "type", "bridge", "priority", "0")
    deadline = time.monotonic() + 20
    while witness.sysfs_bridge(host, other, "root_id") != witness.sysfs_bridge(host, new_root, "bridge_id"):
        assert time.monotonic() < deadline, "the root never changed"
        time.sleep(0.5)
    got = assert_matches_witness(host, collectors)
    root = witness.sysfs_bridge(host, new_root, "bridge_id")
    assert root.startswith("0000.")
    info = [k for k in got if k[0] == "kvmnet_bridge_stp_root_info" and dict(k[1])["bridge"] == other]
    assert len(info) == 1 and dict(info[0][1])["root_id"] == root
    assert value(got, "kvmnet_bridge_stp_root_port", netns=host, bridge=other) > 0
    source.close()
