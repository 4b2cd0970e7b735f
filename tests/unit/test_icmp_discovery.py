"""Discovery's join (learned MACs x neighbours) and its grace period, on in-memory sources."""
import ipaddress
from types import SimpleNamespace as NS

from kvmnet.exporter.prober import targets as guests
from kvmnet.exporter.sources.netlink import Neighbour


class FakeSource:
    def __init__(self, bridges, learned, neigh):
        self._snap = NS(bridges=bridges)
        self._learned = learned
        self._neigh = neigh

    def snapshot(self, stats=True, fdb=True):
        return self._snap

    def learned_macs_by_port(self):
        return self._learned

    def neighbours(self):
        return self._neigh


def port(name, kind):
    return NS(name=name, kind=kind)


def n(dev, addr, mac):
    return Neighbour(dev, ipaddress.ip_address(addr), mac, 2)


SRC = FakeSource(
    [NS(name="br0", ports=[port("vm1eth0", "tap"), port("vm2eth0", "tap"), port("eth1", "veth"),
                           port("vm3eth0", "tap"), port("lab4", "veth")])],
    {"vm1eth0": ["0a:00:00:00:00:01"], "vm2eth0": ["0a:00:00:00:00:02"], "eth1": ["0a:00:00:00:00:99"],
     "vm3eth0": ["0a:00:00:00:00:03"], "lab4": ["0a:00:00:00:00:04"]},
    [n("br0", "fd00::1", "0a:00:00:00:00:01"), n("br0", "10.0.0.11", "0a:00:00:00:00:01"),
     n("br0", "fe80::2", "0a:00:00:00:00:02"),         # link-local only: not probed
     n("br0", "10.0.0.99", "0a:00:00:00:00:99"),       # behind the uplink: not a guest
     n("br1", "10.0.0.3", "0a:00:00:00:00:03"),        # same MAC, another bridge: no
     n("br0", "10.0.0.4", "0a:00:00:00:00:04")])


def test_join_taps_prefers_ipv4_skips_uplinks_and_link_local():
    got = guests.discover_netns("ns", None, SRC)
    assert [(t.name, str(t.address), t.mac, t.bridge, t.device, t.source) for t in got] == \
        [("vm1eth0", "10.0.0.11", "0a:00:00:00:00:01", "br0", "vm1eth0", "discovery")]


def test_identity_names_guests_and_admits_named_non_tap_ports():
    directory = NS(lookup=lambda ns: {"vm1eth0": NS(name="vm1", mac="0a:00:00:00:00:01"),
                                      "lab4": NS(name="g4", mac="")})
    got = {t.name: str(t.address) for t in guests.discover_netns("ns", directory, SRC)}
    assert got == {"vm1": "10.0.0.11", "g4": "10.0.0.4"}


def test_vanished_guest_kept_for_grace_then_forgotten(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(guests.time, "monotonic", lambda: now[0])
    found = [[guests.Target("vm1", ipaddress.ip_address("10.0.0.11"), "ns")]]
    monkeypatch.setattr(guests, "discover_netns", lambda ns, d=None: found[0])
    d = guests.Discovery()
    assert [t.name for t in d.run_once(["ns"])] == ["vm1"]
    found[0] = []
    now[0] += guests.FORGET_AFTER - 1
    assert [t.name for t in d.run_once(["ns"])] == ["vm1"]  # still reported (down) for a while
    now[0] += 2
    assert d.run_once(["ns"]) == []


def test_a_failing_namespace_keeps_what_was_found(monkeypatch):
    d = guests.Discovery()
    monkeypatch.setattr(guests, "discover_netns",
                        lambda ns, d=None: [guests.Target("vm1", ipaddress.ip_address("10.0.0.11"), ns)])
    d.run_once(["ns"])

    def boom(ns, d=None):
        raise OSError("gone")
    monkeypatch.setattr(guests, "discover_netns", boom)
    assert [t.name for t in d.run_once(["ns"])] == ["vm1"]
