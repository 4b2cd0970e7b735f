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
    monkeypatch.setattr(guests, "discover", lambda ns, d=None, s=None: (found[0], set()))
    d = guests.Discovery()
    assert [t.name for t in d.run_once(["ns"])] == ["vm1"]
    found[0] = []
    now[0] += guests.FORGET_AFTER - 1
    assert [t.name for t in d.run_once(["ns"])] == ["vm1"]  # still reported (down) for a while
    now[0] += 2
    assert d.run_once(["ns"]) == []


def test_a_failing_namespace_keeps_what_was_found(monkeypatch):
    d = guests.Discovery()
    monkeypatch.setattr(guests, "discover",
                        lambda ns, d=None, s=None: ([guests.Target("vm1", ipaddress.ip_address("10.0.0.11"), ns)],
                                                    set()))
    d.run_once(["ns"])

    def boom(ns, d=None, s=None):
        raise OSError("gone")
    monkeypatch.setattr(guests, "discover", boom)
    assert [t.name for t in d.run_once(["ns"])] == ["vm1"]


def T(name, device, addr="10.0.0.11", ns="ns"):
    return guests.Target(name, ipaddress.ip_address(addr), ns, "0a:00:00:00:00:01", "br0", device, "discovery")


def test_renamed_guest_replaces_its_tap_named_entry_at_once(monkeypatch):
    """Found under its tap's name before its QEMU was scanned, then named: one entry, no 5-minute leftover."""
    found = [([T("vnet8", "vnet8")], {"vnet8", "br0"})]
    monkeypatch.setattr(guests, "discover", lambda ns, d=None, s=None: found[0])
    d = guests.Discovery()
    assert [t.name for t in d.run_once(["ns"])] == ["vnet8"]
    found[0] = ([T("web01", "vnet8")], {"vnet8", "br0"})
    assert [t.name for t in d.run_once(["ns"])] == ["web01"]


def test_guest_whose_tap_is_gone_is_kept_down_pointing_at_no_device(monkeypatch):
    found = [([T("web01", "vnet8")], {"vnet8", "br0"})]
    monkeypatch.setattr(guests, "discover", lambda ns, d=None, s=None: found[0])
    d = guests.Discovery()
    d.run_once(["ns"])
    found[0] = ([], {"br0"})
    got = d.run_once(["ns"])
    assert [(t.name, t.device, t.bridge) for t in got] == [("web01", "", "")]
    # back on a new tap (libvirt start): that one, and only that one
    found[0] = ([T("web01", "vnet9")], {"vnet9", "br0"})
    assert [(t.name, t.device) for t in d.run_once(["ns"])] == [("web01", "vnet9")]


def test_two_unnamed_guests_on_one_bridge_are_two_targets():
    """QEMU without -name (the seed): the identity gives each the name of its tap, never one shared ""."""
    directory = NS(lookup=lambda ns: {"vm1eth0": NS(name="vm1eth0", mac="0a:00:00:00:00:01", source="qemu"),
                                      "vm2eth0": NS(name="vm2eth0", mac="0a:00:00:00:00:02", source="qemu")})
    src = FakeSource([NS(name="br0", ports=[port("vm1eth0", "tap"), port("vm2eth0", "tap")])], {},
                     [n("br0", "10.0.0.11", "0a:00:00:00:00:01"), n("br0", "10.0.0.12", "0a:00:00:00:00:02")])
    got = sorted((t.name, str(t.address)) for t in guests.discover_netns("ns", directory, src))
    assert got == [("vm1eth0", "10.0.0.11"), ("vm2eth0", "10.0.0.12")]


PVE = FakeSource(
    [NS(name="vmbr0", ports=[port("eth0", "physical"), port("fwpr100p0", "veth"), port("tap101i0", "tap")]),
     NS(name="fwbr100i0", ports=[port("fwln100i0", "veth"), port("tap100i0", "tap")])],
    {"tap100i0": ["bc:24:11:00:01:00"], "tap101i0": ["bc:24:11:00:01:01"],
     # flooded from vmbr0 through the firewall chain: every guest's MACs are learned on the fw ports
     "fwln100i0": ["bc:24:11:00:01:01", "bc:24:11:00:01:00"], "fwpr100p0": ["bc:24:11:00:01:00"]},
    [n("vmbr0", "10.1.0.100", "bc:24:11:00:01:00"), n("vmbr0", "10.1.0.101", "bc:24:11:00:01:01")])
PVE._snap.links = {"fwpr100p0": "fwln100i0", "fwln100i0": "fwpr100p0"}


def test_proxmox_firewalled_guest_found_through_the_fw_chain_and_fw_ports_skipped():
    directory = NS(lookup=lambda ns: {
        "tap100i0": NS(name="web01", mac="bc:24:11:00:01:00", source="qemu"),
        "tap101i0": NS(name="db01", mac="bc:24:11:00:01:01", source="qemu"),
        "fwbr100i0": NS(name="web01", mac="", source="firewall"),
        "fwln100i0": NS(name="web01", mac="", source="firewall"),
        "fwpr100p0": NS(name="web01", mac="", source="firewall")})
    got = sorted((t.name, str(t.address), t.bridge, t.device) for t in guests.discover_netns("ns", directory, PVE))
    assert got == [("db01", "10.1.0.101", "vmbr0", "tap101i0"), ("web01", "10.1.0.100", "fwbr100i0", "tap100i0")]
    # without identity (--no-collector.identity) the veths are not guests either
    got = sorted((t.name, t.device) for t in guests.discover_netns("ns", None, PVE))
    assert got == [("tap100i0", "tap100i0"), ("tap101i0", "tap101i0")]


def test_macvtap_guest_found_through_a_macvlan_sibling_and_nat_guest_from_its_lease():
    mv = NS(name="macvtap0", kind="macvtap", mac="52:54:00:79:00:13", lower="kvlow0")
    src = FakeSource([NS(name="virbr1", ports=[port("vnet1", "tap")])], {}, [
        n("kvmv0", "10.79.0.13", "52:54:00:79:00:13"),   # the host's macvlan sibling on kvlow0
        n("other", "10.9.9.9", "52:54:00:78:00:12")])    # same MAC elsewhere: not the NAT guest's bridge
    src._snap.macvtaps = [mv]
    src._snap.links = {"macvtap0": "kvlow0", "kvmv0": "kvlow0"}
    directory = NS(lookup=lambda ns: {"macvtap0": NS(name="dir1", mac="52:54:00:79:00:13", source="libvirt"),
                                      "vnet1": NS(name="nat1", mac="52:54:00:78:00:12", source="libvirt")},
                   leases=lambda ns: {("virbr1", "52:54:00:78:00:12"): ipaddress.ip_address("10.78.0.152")})
    got = sorted((t.name, str(t.address), t.bridge, t.device) for t in guests.discover_netns("ns", directory, src))
    assert got == [("dir1", "10.79.0.13", "", "macvtap0"), ("nat1", "10.78.0.152", "virbr1", "vnet1")]


def test_prober_keeps_counters_of_a_renamed_guest():
    """Renamed on the same device and address: one continuous state, the old name's series gone at once."""
    from kvmnet.exporter.prober.engine import Prober
    p = Prober()
    p.set_targets([T("vnet8", "vnet8")], source="discovery")
    st = p.states[("ns", "vnet8")]
    st.requests, st.replies = 7, 6
    p.set_targets([T("web01", "vnet8")], source="discovery")
    assert list(p.states) == [("ns", "web01")]
    assert p.states[("ns", "web01")] is st and (st.requests, st.replies) == (7, 6)
    assert st.target.name == "web01"
