"""Plans from hand-made observations: what `up` would do on an empty machine, on a finished lab, and in between."""
from __future__ import annotations

import copy

import pytest

from kvmnet.common.lab import parse_lab
from kvmnet.setup.plan import Link, Observed, Refused, plan

LAB = {
    "name": "p",
    "namespaces": {"host": "p-host", "lan": "p-lan"},
    "bridges": [{"name": "br0", "address": "192.168.98.100/24", "ports": ["eth1"]}],
    "uplink": {"name": "eth1", "address": "192.168.98.100/24", "lan": {"addresses": ["192.168.98.3/24"]}},
    "taps": [{"name": "t0", "bridge": "br0"}],
    "guests": [
        {"name": "vm1", "tap": "vm1eth0", "bridge": "br0", "address": "192.168.98.11/24"},
        {"name": "g1", "kind": "netns", "tap": "g1h", "bridge": "br0", "address": "192.168.98.21/24"},
    ],
}
BR = {"stp_state": 0, "forward_delay": 1500, "hello_time": 200, "max_age": 2000, "priority": 32768}


def lab(**changes):
    d = copy.deepcopy(LAB)
    d.update(changes)
    return parse_lab(d)


def done() -> Observed:
    """What a finished `up` of LAB looks like."""
    return Observed(
        namespaces={"p-host", "p-lan", "p-host-g1"},
        links={
            "p-host": {
                "br0": Link("br0", "bridge", None, True, ["192.168.98.100/24"], dict(BR)),
                "eth1": Link("eth1", "veth", "br0", True),
                "t0": Link("t0", "tun", "br0", True),
                "vm1eth0": Link("vm1eth0", "tun", "br0", True),
                "g1h": Link("g1h", "veth", "br0", True),
            },
            "p-lan": {"eth0": Link("eth0", "veth", None, True, ["192.168.98.3/24"])},
        },
        light_ok={"g1"}, qemu_alive={"vm1"},
        # all of it made by this lab, as its record's identities say
        ours_ns={"p-host", "p-lan", "p-host-g1"},
        ours_links={"p-host": {"br0", "eth1", "t0", "vm1eth0", "g1h"}, "p-lan": {"eth0"}},
    )


def ops(actions):
    return [(a.op, a.name) for a in actions]


def test_from_nothing_in_order():
    acts = plan(lab(), Observed())
    assert ops(acts) == [
        ("netns_add", "p-host"), ("netns_add", "p-lan"),
        ("bridge_add", "br0"), ("addr_add", "br0"), ("up", "br0"),
        ("veth_add", "eth1"), ("addr_add", "eth1"), ("up", "eth1"), ("addr_add", "eth0"), ("up", "eth0"),
        ("addr_flush", "eth1"), ("master", "eth1"),   # the seed's address move, then brctl addif
        ("tap_add", "t0"), ("master", "t0"), ("up", "t0"),
        ("tap_add", "vm1eth0"),                        # enslaved by kvmnet-ifup when QEMU starts
        ("light_add", "g1"),
        ("guest_start", "vm1"),
    ]
    assert acts[0].ns == "" and acts[2].ns == "p-host" and acts[8].ns == "p-lan"
    assert acts[10].args["addresses"] == ["192.168.98.100/24"]
    assert str(acts[10]) == "move addresses off eth1 in p-host: flush 192.168.98.100/24"


def test_finished_lab_needs_nothing():
    assert plan(lab(), done()) == []


def test_only_the_difference():
    obs = done()
    obs.links["p-host"]["t0"].master = None
    obs.links["p-host"]["br0"].up = False
    obs.light_ok.clear()
    obs.qemu_alive.clear()
    assert ops(plan(lab(), obs)) == [("up", "br0"), ("master", "t0"), ("light_del", "g1"), ("light_add", "g1"),
                                     ("guest_start", "vm1")]


def test_running_guest_whose_tap_lost_its_bridge_is_repaired():
    obs = done()
    obs.links["p-host"]["vm1eth0"].master = None
    assert ops(plan(lab(), obs)) == [("master", "vm1eth0")]


def test_stp_change_sets_bridge_options_in_kernel_units():
    l = lab(bridges=[{"name": "br0", "address": "192.168.98.100/24", "ports": ["eth1"],
                      "stp": {"enabled": True, "forward_delay": 4}}])
    acts = plan(l, done())
    assert ops(acts) == [("bridge_set", "br0")]
    assert acts[0].args["stp"]["enabled"] is True and acts[0].args["stp"]["forward_delay"] == 4


def test_fdb_learning_limit_is_set_once():
    l = lab(bridges=[{"name": "br0", "address": "192.168.98.100/24", "ports": ["eth1"], "fdb_max_learned": 64}])
    acts = plan(l, done())
    assert ops(acts) == [("bridge_set", "br0")] and acts[0].args["fdb_max_learned"] == 64
    obs = done()
    obs.links["p-host"]["br0"].bridge["fdb_max_learned"] = 64
    assert plan(l, obs) == []
    assert plan(lab(), obs) == []  # unset in the lab: the kernel's value is left alone


def test_default_route_uplink_refused_unless_forced():
    up = {"name": "eth1", "address": "192.168.98.100/24", "gateway": "192.168.98.1", "lan": {"addresses": []}}
    with pytest.raises(Refused, match="eth1 carries the default route.*--force"):
        plan(lab(uplink=up), Observed())
    acts = plan(lab(uplink=up), Observed(), force=True)
    i = ops(acts).index(("addr_flush", "eth1"))
    assert ops(acts)[i + 1] == ("route_add", "br0") and acts[i + 1].args["gateway"] == "192.168.98.1"


def test_host_mode_moves_addresses_of_the_real_uplink():
    d = copy.deepcopy(LAB)
    d.update(mode="host", uplink={"name": "eth1"})
    del d["namespaces"]
    l = parse_lab(d)
    obs = Observed(links={"": {"eth1": Link("eth1", "", None, True, ["192.168.98.100/24"])}},
                   default_dev={"": "eth0"}, default_gw={"": "10.0.0.1"})
    acts = plan(l, obs)
    assert ("addr_flush", "eth1") in ops(acts) and ("netns_add", "p-host") not in ops(acts)
    assert all(a.ns == "" for a in acts if a.op != "light_add") and acts[0].op == "bridge_add"
    obs.default_dev[""] = "eth1"
    with pytest.raises(Refused, match="default route"):
        plan(l, obs)
    with pytest.raises(Refused, match="no such device"):
        plan(l, Observed(links={"": {}}))


def test_nat_when_table_missing():
    l = parse_lab(dict(name="n", namespaces={"host": "n-h", "lan": "n-w"},
                       bridges=[{"name": "br0", "address": "10.0.0.1/24"}],
                       uplink={"name": "wan0", "address": "203.0.113.1/24", "lan": {"addresses": ["203.0.113.2/24"]}},
                       nat={"bridge": "br0", "out": "wan0"}))
    acts = plan(l, Observed())
    nat = [a for a in acts if a.op == "nat_add"]
    assert nat and nat[0].args == {"bridge": "br0", "out": "wan0", "network": "10.0.0.0/24"}
    assert ("addr_flush", "wan0") not in ops(acts)  # routed, not bridged: its address stays


# --- names taken by what this lab did not make: refused, nothing done -------------------------------------------

@pytest.mark.parametrize("change, field", [
    (lambda o: o.ours_ns.discard("p-host"), "namespaces.host: namespace 'p-host' exists and was not made by lab p"),
    (lambda o: o.ours_ns.discard("p-lan"), "namespaces.lan: namespace 'p-lan'"),
    (lambda o: (o.ours_ns.discard("p-host-g1"), o.light_ok.clear()), "guests[1].netns: namespace 'p-host-g1'"),
    (lambda o: o.ours_links["p-host"].discard("br0"), "bridges[0].name: device 'br0' exists in namespace p-host"),
    (lambda o: o.ours_links["p-host"].discard("t0"), "taps[0].name: device 't0'"),
    (lambda o: o.ours_links["p-host"].discard("vm1eth0"), "guests[0].tap: device 'vm1eth0'"),
    (lambda o: (o.ours_links["p-host"].discard("g1h"), o.light_ok.clear()), "guests[1].tap: device 'g1h'"),
    (lambda o: o.ours_links["p-host"].discard("eth1"), "uplink.name: device 'eth1'"),
])
def test_a_name_taken_by_something_not_ours_is_refused(change, field):
    obs = done()
    change(obs)
    with pytest.raises(Refused) as e:
        plan(lab(), obs)
    assert str(e.value).startswith(field) and "never adopts" in str(e.value) and "\n" not in str(e.value)


def test_half_made_namespace_file_not_ours_is_named_as_such():
    obs = Observed(namespaces={"p-host"}, not_namespaces={"p-host"})
    with pytest.raises(Refused, match=r"namespaces.host: .*a plain file, not a namespace"):
        plan(lab(), obs)


def test_light_guest_namespace_taken_before_up():
    obs = Observed(namespaces={"p-host-g1"})
    with pytest.raises(Refused, match=r"guests\[1\]\.netns: namespace 'p-host-g1' exists"):
        plan(lab(), obs)


def test_nat_table_not_ours_is_refused():
    l = parse_lab(dict(name="n", namespaces={"host": "n-h", "lan": "n-w"},
                       bridges=[{"name": "br0", "address": "10.0.0.1/24"}],
                       uplink={"name": "wan0", "address": "203.0.113.1/24", "lan": {"addresses": ["203.0.113.2/24"]}},
                       nat={"bridge": "br0", "out": "wan0"}))
    with pytest.raises(Refused, match="nat: nft table inet kvmnet exists in namespace n-h"):
        plan(l, Observed(nat={"n-h"}))
    assert not [a for a in plan(l, Observed(nat={"n-h"}, ours_nat={"n-h"})) if a.op == "nat_add"]
