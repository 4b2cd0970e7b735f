"""Pure parse tests on recorded rtnetlink dumps (tests/unit/data/*.bin, made by tests/unit/record_netlink.py),
and the collectors' exposition compared with a golden file.

Regenerate the golden file after an intended change of the output:

    KVMNET_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_netlink_parse.py
"""
from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmnet.exporter.collectors.bridge import (
    _filter,
    _Prefixes,
    bridge_families,
    bridge_stp_families,
    mac_conflict_family,
)
from kvmnet.exporter.collectors.fdb import fdb_families, fdb_internal_families
from kvmnet.exporter.exposition import render
from kvmnet.exporter.sources import netlink as nl

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
GOLDEN = HERE / "golden" / "bridges.prom"
ODD = 'vm"2\\é'


def chunks(name: str) -> list[bytes]:
    return [(DATA / f"{name}.bin").read_bytes()]


@pytest.fixture(scope="module")
def links():
    return nl.links_from_dump(chunks("links"))


@pytest.fixture(scope="module")
def by_name(links):
    return {l.name: l for l in links.values()}


def snapshot(links=None, fdb=True, moves=None) -> nl.BridgeSnapshot:
    links = links if links is not None else nl.links_from_dump(chunks("links"))
    table = nl.fdb_from_dump(chunks("fdb")) if fdb else None
    stp = {}
    stats = nl.stats_from_dump(chunks("stats"), stp)
    return nl.build_snapshot("lab", links, stats, table, stp=stp, qdiscs=nl.qdiscs_from_dump(chunks("qdisc")),
                             bridges_now=nl.links_from_dump(chunks("bridges")), moves=moves if moves is not None else {})


def test_links(by_name):
    assert sorted(by_name) == sorted(["lo", "br0", "br1", "vm0", "vm1", ODD, "x.y-z_0", "tun0", "ve0", "ve0p"])
    br0, br1 = by_name["br0"], by_name["br1"]
    assert (br0.kind, br0.stp_enabled, br0.mac) == ("bridge", False, "02:42:00:00:00:01")
    assert (br1.kind, br1.stp_enabled) == ("bridge", True)
    vm0 = by_name["vm0"]
    assert (vm0.kind, vm0.master, vm0.mac, vm0.stp_state) == ("tap", br0.index, "0a:00:00:00:00:01", 3)
    assert vm0.flags & nl.IFF_LOWER_UP and not by_name["vm1"].flags & nl.IFF_LOWER_UP
    assert vm0.carrier_changes == 2 and by_name["vm1"].carrier_changes == 1
    assert by_name["tun0"].kind == "tun" and by_name["ve0"].kind == "veth" and by_name["lo"].kind == "physical"
    assert by_name["ve0"].stp_state == 1  # listening: br1 runs STP and the recording caught it early
    assert by_name[ODD].master == br0.index


def test_stats(by_name):
    st = nl.stats_from_dump(chunks("stats"))
    # Three 100-byte broadcast frames written into vm0's fd: the tap received them (the host's view).
    assert st[by_name["vm0"].index] == nl.Counters(rx_packets=3, tx_packets=0, rx_bytes=300, tx_bytes=0)
    br0 = st[by_name["br0"].index]
    assert (br0.rx_packets, br0.rx_dropped) == (3, 3)  # delivered up to br0's own stack, no protocol for them


def test_bridge_info_limit_and_root(by_name):
    now = nl.links_from_dump(chunks("bridges"))
    assert sorted(l.name for l in now.values()) == ["br0", "br1"]  # the kind filter: bridges only
    br0 = now[by_name["br0"].index].br
    assert br0.fdb_max_learned == 64 and br0.fdb_n_learned == 1  # vm0's frames' source MAC
    assert br0.bridge_id == "8000.024200000001" and br0.root_id == br0.bridge_id and br0.root_port == 0
    assert by_name["br1"].br.fdb_max_learned == 0  # the kernel's default: no limit


def test_stp_xstats_and_txqlen(by_name):
    stp = {}
    nl.stats_from_dump(chunks("stats"), stp)
    ports = {n for n, l in by_name.items() if l.master}
    assert {n for n, l in by_name.items() if l.index in stp} == ports  # bridge ports only
    ve0 = stp[by_name["ve0"].index]
    assert ve0.transition_blk >= 1 and ve0.transition_fwd == 0 and ve0.rx_bpdu == 0  # STP starts a port blocking;
    # recorded while still listening; alone on br1, nothing received
    assert by_name["vm0"].txqlen == 1000 and by_name["ve0"].txqlen == 1000


def test_root_qdiscs(by_name):
    q = nl.qdiscs_from_dump(chunks("qdisc"))
    assert q[by_name["ve0"].index].kind == "tbf"
    assert q[by_name["vm0"].index].kind in ("pfifo_fast", "fq_codel")  # net.core.default_qdisc
    assert by_name["vm1"].index in q  # admin up without carrier: it has its default qdisc


def test_qdisc_cache_gives_the_same_and_follows_changes(by_name):
    data = chunks("qdisc")
    cache = {}
    first = nl.qdiscs_from_dump(data, cache)
    assert first == nl.qdiscs_from_dump(data) and nl.qdiscs_from_dump(data, cache) == first
    ve0 = by_name["ve0"].index
    old = cache[ve0][1]
    cache[ve0] = (b"stale", nl.Qdisc("bogus"))  # a changed message is decoded again
    assert nl.qdiscs_from_dump(data, cache)[ve0] == old
    del cache[ve0]
    assert nl.qdiscs_from_dump([b""], cache) == {} and cache == {}  # devices gone: dropped from the cache


def test_fdb_move_events_count_onto_the_new_port(by_name):
    links = nl.links_from_dump(chunks("links"))
    table = nl.fdb_from_dump(chunks("fdb"))
    moves = {}
    moved = []
    nl.apply_events((DATA / "events.bin").read_bytes(), links, table, moves, moved)
    vm9 = next(l.index for l in links.values() if l.name == "vm9")
    assert moves == {vm9: 1}
    vm8 = next(l.index for l in links.values() if l.name == "vm8")
    assert [(k[1], a, b) for k, a, b in moved] == [("0a:00:00:00:00:77", vm8, vm9)]
    snap = nl.build_snapshot("lab", links, {i: nl.Counters() for i in links}, table, moves=moves)
    assert {p.name: p.fdb_moves for p in snap.bridges[0].ports}["vm9"] == 1


def test_moves_across_a_resync_count_once():
    # After an event overflow the tables are dumped again: an entry on another port counts one move.
    old = {(1, "0a:00:00:00:00:05", 0): (2, nl.LEARNED), (1, "0a:00:00:00:00:06", 0): (2, nl.STATIC),
           (1, "0a:00:00:00:00:07", 0): (3, nl.LEARNED)}
    new = {(1, "0a:00:00:00:00:05", 0): (3, nl.LEARNED), (1, "0a:00:00:00:00:06", 0): (3, nl.STATIC),
           (1, "0a:00:00:00:00:07", 0): (3, nl.LEARNED)}
    moves = {3: 2}
    assert nl.count_moves(old, new, moves) == 1 and moves == {3: 3}


def test_fdb(by_name):
    table = nl.fdb_from_dump(chunks("fdb"))
    per = {}
    for (_master, _mac, _vlan), (ifindex, typ) in table.items():
        per.setdefault(ifindex, [0, 0, 0])[typ] += 1
    idx = {n: l.index for n, l in by_name.items()}
    assert per[idx["vm1"]] == [1, 3, 0]
    assert per[idx["vm0"]] == [2, 0, 1]  # own MAC, one added permanent, the learned source of the frames
    assert per[idx[ODD]] == [1, 1, 0]
    assert per[idx["br0"]] == [2, 0, 0]  # the bridge's own address and one added with `self permanent`
    # The per-device "self" entries (multicast lists) are not bridge FDB entries.
    assert not [k for k in table if k[1].startswith(("33:33", "01:00:5e"))]


def test_neighbours(links):
    got = nl.neighbours_from_dump(chunks("neigh"), links)
    assert [(n.device, str(n.address), n.mac) for n in got] == [("br0", "10.0.0.9", "0a:00:00:00:09:09")]


def test_events_move_the_tables(by_name):
    links = nl.links_from_dump(chunks("links"))
    table = nl.fdb_from_dump(chunks("fdb"))
    nl.apply_events((DATA / "events.bin").read_bytes(), links, table)
    snap = nl.build_snapshot("lab", links, {i: nl.Counters() for i in links}, table)
    br0 = {p.name: p for p in snap.bridges[0].ports}
    assert "vm1" not in br0 and "vm9" in br0
    assert br0["vm9"].fdb == nl.FdbCounts(local=1, static=1, learned=1)  # the MAC that moved from vm8
    assert br0["vm8"].fdb == nl.FdbCounts(local=1, static=0, learned=0)
    assert not br0["vm0"].up  # its fd was closed before the events were recorded
    assert not [k for k, (ifindex, _t) in table.items() if ifindex == by_name["vm1"].index]


def test_snapshot_is_sorted_and_joins(by_name):
    snap = snapshot()
    assert [b.name for b in snap.bridges] == ["br0", "br1"]
    assert [p.name for p in snap.bridges[0].ports] == sorted(["vm0", "vm1", ODD, "x.y-z_0"])
    assert snap.bridges[0].fdb == nl.FdbCounts(local=7, static=4, learned=1)  # 2 on br0 itself, 2 vm0, 1 on each other tap


def test_a_device_without_counters_vanished_and_is_left_out(by_name):
    links = nl.links_from_dump(chunks("links"))
    stats = nl.stats_from_dump(chunks("stats"))
    del stats[by_name["vm1"].index]
    snap = nl.build_snapshot("lab", links, stats, None)
    assert "vm1" not in [p.name for p in snap.bridges[0].ports]


def test_truncated_and_garbage_buffers_raise_only_malformed():
    data = (DATA / "links.bin").read_bytes()
    for cut in range(0, len(data), 53):
        nl.links_from_dump([data[:cut]])
    rnd = random.Random(7)
    for _ in range(200):
        buf = bytearray(data)
        for _ in range(20):
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        for decode in (nl.links_from_dump, nl.fdb_from_dump, nl.stats_from_dump):
            try:
                decode([bytes(buf)])
            except ValueError:
                pass  # Malformed (a length that runs past its message): the source fails that dump, says why
            except Exception as exc:  # noqa: BLE001 - anything else would escape as a crash
                pytest.fail(f"garbage raised {exc!r}")


def _render_golden() -> bytes:
    # vm0 and vm1 claim the same MAC: a cloned guest, flagged by kvmnet_guest_mac_conflict.
    guests = {"vm0": SimpleNamespace(name="vm-zero", mac="0a:00:00:00:00:05"),
              "vm1": SimpleNamespace(name="vm-one", mac="0A:00:00:00:00:05")}
    links = nl.links_from_dump(chunks("links"))
    snap = snapshot(links, moves={links_by_name(links)["vm1"]: 3})
    every = lambda _n: True  # noqa: E731
    return render(bridge_families(snap, guests) + fdb_families(snap)
                  + bridge_stp_families(snap) + [mac_conflict_family(snap, guests)]
                  + fdb_internal_families(snap, every, _Prefixes()))


def links_by_name(links) -> dict[str, int]:
    return {l.name: l.index for l in links.values()}


def test_golden_exposition():
    out = _render_golden()
    if os.environ.get("KVMNET_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(out)
    assert out == GOLDEN.read_bytes(), "exposition changed; KVMNET_UPDATE_GOLDEN=1 regenerates the golden file"


def test_golden_parses_and_passes_promtool():
    text = GOLDEN.read_text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    odd = dict(netns="lab", bridge="br0", device=ODD.replace("\\", "\\\\"))  # the name mapping doubles backslashes
    assert samples[("kvmnet_port_up", tuple(sorted(odd.items())))] == 0
    vm0 = dict(netns="lab", bridge="br0", device="vm0")
    assert samples[("kvmnet_port_receive_bytes_total", tuple(sorted(vm0.items())))] == 300
    info = [k for k in samples if k[0] == "kvmnet_port_info" and ("device", "vm0") in k[1]]
    assert ("guest", "vm-zero") in info[0][1] and ("kind", "tap") in info[0][1]
    assert samples[("kvmnet_bridge_fdb_learned_limit", (("bridge", "br0"), ("netns", "lab")))] == 64
    assert samples[("kvmnet_port_fdb_moves_total", tuple(sorted(dict(odd, device="vm1").items())))] == 3
    assert samples[("kvmnet_guest_mac_conflict", tuple(sorted(dict(vm0, guest="vm-zero", mac="0a:00:00:00:00:05")
                                                               .items())))] == 2
    res = subprocess.run(["promtool", "check", "metrics"], input=GOLDEN.read_bytes(), capture_output=True)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res


def test_stp_state_set_has_one_current_state():
    snap = snapshot(fdb=False)
    snap.bridges[0].ports[0].stp_state = 9  # not a state we know: all zero, never a crash
    fams = {f.name: f for f in bridge_families(snap)}
    lines = fams["kvmnet_port_stp_state"].lines
    text = "\n".join(lines)
    assert text.count(" 1") == len(snap.bridges[0].ports) - 1 + len(snap.bridges[1].ports)
    assert all(f.name for f in fdb_families(snap)) and not fdb_families(snap)[0].lines  # no FDB asked, no series


def test_include_exclude():
    keep = _filter(re.compile("^vm"), re.compile("1$"))
    snap = snapshot()
    text = render(bridge_families(snap, keep=keep) + fdb_families(snap, keep=keep)).decode()
    devices = set(re.findall(r'device="([^"\\]*(?:\\.[^"\\]*)*)"', text))
    assert devices == {"vm0", 'vm\\"2\\\\\\\\é'}  # the backslash doubled by the name mapping, then escaped
    # Bridges are always reported (the filter is for ports), and count every port.
    assert 'kvmnet_bridge_ports{netns="lab",bridge="br0"} 4' in text
    assert 'kvmnet_bridge_fdb_entries{netns="lab",bridge="br0",type="static"} 4' in text


def test_rows_cache_is_reused_and_pruned():
    from kvmnet.exporter.collectors.bridge import _Rows
    rows = _Rows()
    snap = snapshot()
    a = render(bridge_families(snap, rows=rows))
    n = len(rows.ports)
    assert render(bridge_families(snapshot(), rows=rows)) == a and len(rows.ports) == n
    snap.bridges[0].ports.pop()
    bridge_families(snap, rows=rows)
    assert len(rows.ports) == n - 1
