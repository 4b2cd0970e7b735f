"""Fuzz: arbitrary byte-string bridge, port, guest and namespace names through the real collectors' rendering
(bridge_families, GuestCollector) must give an exposition client_python parses, with every label equal to the
documented mapping (README "Odd names") and distinct names never sharing a series; a batch of the generated
expositions is checked by one `promtool check metrics` call."""
import ipaddress
import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kvmnet.exporter.collectors.bridge import bridge_families
from kvmnet.exporter.collectors.probe import GuestCollector
from kvmnet.exporter.exposition import render
from kvmnet.exporter.prober.state import BUCKETS
from kvmnet.exporter.prober.targets import Target
from kvmnet.exporter.sources.identity import GuestIdentity
from kvmnet.exporter.sources.netlink import Bridge, BridgeSnapshot, Counters, Port
from tests.witness import expected_label

names = st.binary(min_size=1, max_size=15)
s = lambda raw: raw.decode("utf-8", "surrogateescape")  # noqa: E731 - how sources/netlink.py decodes names


class _Prober:
    def __init__(self, targets):
        self.targets = targets

    def snapshot(self):
        return [(t, True, 3, 2, 0, 1.5, [1] * len(BUCKETS), 0.001, 2) for t in self.targets]

    def sockets(self):
        return [(t.netns, "ipv4", "raw") for t in self.targets[:1]]

    def unavailable(self):
        return {}


def exposition(ns: bytes, bridges: list[bytes], ports: list[bytes], guests: list[bytes], prefix: str = ""):
    # Ports are shared round-robin among the bridges; each port has a guest.
    brs = [Bridge(i + 1, s(b), "02:00:00:00:00:01", 0x10000, 0, False, Counters(*range(8))) for i, b in
           enumerate(bridges)]
    for j, p in enumerate(ports):
        brs[j % len(brs)].ports.append(Port(100 + j, s(p), "tap", "02:00:00:00:01:01", 0x10000, 1, 3,
                                            Counters(*range(j, j + 8))))
    netns = prefix + s(ns)
    who = {s(p): GuestIdentity(s(g), "02:00:00:00:02:02", "qemu") for p, g in zip(ports, guests)}
    fams = bridge_families(BridgeSnapshot(netns, brs), who)
    targets = [Target(s(g), ipaddress.ip_address(f"10.0.{k // 250}.{k % 250 + 1}"), netns, device=s(p))
               for k, (p, g) in enumerate(zip(ports, guests))]
    fams += GuestCollector(_Prober(targets)).collect()
    return fams


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ns=names, bridges=st.lists(names, min_size=1, max_size=4, unique=True),
       ports=st.lists(names, min_size=1, max_size=6, unique=True), data=st.data())
def test_arbitrary_byte_names_render_parse_and_never_collide(ns, bridges, ports, data):
    guests = data.draw(st.lists(names, min_size=len(ports), max_size=len(ports), unique=True))
    body = render(exposition(ns, bridges, ports, guests)).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(body)}
    got = {smp.labels["bridge"] for smp in parsed["kvmnet_bridge_up"].samples}
    assert got == {expected_label(b) for b in bridges} and len(got) == len(bridges)
    devices = {smp.labels["device"] for smp in parsed["kvmnet_port_up"].samples}
    assert devices == {expected_label(p) for p in ports} and len(devices) == len(ports)
    assert {smp.labels["netns"] for smp in parsed["kvmnet_port_up"].samples} == {expected_label(ns)}
    up = parsed["kvmnet_guest_up"].samples
    assert {smp.labels["guest"] for smp in up} == {expected_label(g) for g in guests} and len(up) == len(guests)
    info = {smp.labels["device"]: smp.labels["guest"] for smp in parsed["kvmnet_port_info"].samples}
    assert info == {expected_label(p): expected_label(g) for p, g in zip(ports, guests)}


def test_promtool_accepts_a_batch_of_generated_expositions():
    fams = []
    batch = st.tuples(names, st.lists(names, min_size=1, max_size=3, unique=True),
                      st.lists(names, min_size=1, max_size=3, unique=True))

    @settings(max_examples=60, deadline=None, database=None)
    @given(batch)
    def collect(example):
        ns, bridges, ports = example
        guests = [p + b"g" for p in ports]  # unique because ports are
        fams.extend(exposition(ns, bridges, ports, guests, prefix=f"s{len(fams)}-"))

    collect()
    body = render(fams)
    res = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    # promtool lints too; the only allowed complaint would be about our own naming, and there is none
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    assert list(text_string_to_metric_families(body.decode()))
