"""Pure prober logic: histogram buckets, the down rule, target replacement keeping counters, rendering."""
import ipaddress
import socket
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmnet.exporter.collectors.probe import GuestCollector
from kvmnet.exporter.exposition import render
from kvmnet.exporter.prober import state as icmp
from kvmnet.exporter.prober.engine import Prober
from kvmnet.exporter.prober.http import _budget
from kvmnet.exporter.prober.state import BUCKETS, GuestState
from kvmnet.exporter.prober.targets import Target


def T(name, addr, netns="ns", **kw):
    return Target(name, ipaddress.ip_address(addr), netns, **kw)


def test_buckets_span_10us_to_seconds():
    assert BUCKETS[0] == 10e-6 and BUCKETS[-1] > 5
    assert icmp.bucket_index(10e-6) == 0
    assert icmp.bucket_index(11e-6) == 1
    assert icmp.bucket_index(1e-9) == 0
    assert icmp.bucket_index(100.0) == len(BUCKETS)


def test_down_after_k_consecutive_losses_and_up_on_reply():
    st = GuestState(T("g", "10.0.0.1"))
    assert not st.up  # never answered
    st.on_reply(20e-6, 1000.0)
    assert st.up and st.last_reply == 1000.0
    st.on_loss(3)
    st.on_loss(3)
    assert st.up
    st.on_reply(30e-6, 1001.0)
    st.on_loss(3)
    st.on_loss(3)
    assert st.up
    st.on_loss(3)
    assert not st.up
    st.on_reply(30e-6, 1002.0)
    assert st.up and st.lost_in_row == 0


def test_cumulative_histogram():
    st = GuestState(T("g", "10.0.0.1"))
    for r in (5e-6, 15e-6, 15e-6, 99.0):
        st.on_reply(r, 0)
    cum = st.cumulative()
    assert len(cum) == len(BUCKETS)
    assert cum[0] == 1 and cum[1] == 3 and cum[-1] == 3  # the 99 s one is only in +Inf
    assert sum(st.buckets) == 4


def test_set_targets_keeps_counters_of_targets_that_stay():
    p = Prober()
    p.set_targets([T("a", "10.0.0.1"), T("b", "10.0.0.2")])
    p.states[("ns", "a")].requests = 7
    p.set_targets([T("a", "10.0.0.1", mac="0a:00:00:00:00:01"), T("c", "10.0.0.3")])
    assert sorted(p.states) == [("ns", "a"), ("ns", "c")]
    assert p.states[("ns", "a")].requests == 7
    assert p.states[("ns", "a")].target.mac == "0a:00:00:00:00:01"


def test_static_targets_win_over_discovered_by_name_and_by_address():
    p = Prober()
    p.set_targets([T("vm1", "10.0.0.1")])
    p.set_targets([T("vm1", "10.0.0.9", source="discovery"), T("vm1eth0", "10.0.0.1", source="discovery"),
                   T("vm2", "10.0.0.2", source="discovery")], source="discovery")
    got = {(t.name, str(t.address)) for t in p.targets()}
    assert got == {("vm1", "10.0.0.1"), ("vm2", "10.0.0.2")}


def test_address_change_keeps_state_and_switches_family():
    p = Prober()
    p.set_targets([T("a", "10.0.0.1")])
    p.set_targets([T("a", "fd00::1")])
    assert p.states[("ns", "a")].family == socket.AF_INET6


def test_target_of_lab_guest_and_config_target():
    guest = SimpleNamespace(name="vm1", address=ipaddress.ip_interface("192.168.98.11/24"), mac="0a:e8:4f:c5:6a:16",
                            bridge="br0", device="vm1eth0")
    t = Target.of(guest)
    assert (t.address, t.netns, t.device) == (ipaddress.ip_address("192.168.98.11"), "", "vm1eth0")
    cfg = SimpleNamespace(name="g0", address=ipaddress.ip_address("10.99.0.3"), netns=None)
    assert Target.of(cfg).netns == ""


def test_collector_renders_all_series_for_a_guest_that_never_answered():
    p = Prober()
    p.set_targets([T("quiet", "10.0.0.1"), T("vm1", "10.0.0.2", mac="0a:00:00:00:00:02", bridge="br0",
                                             device="vm1eth0")])
    st = p.states[("ns", "vm1")]
    st.requests, st.send_errors = 3, 1
    p._task = SimpleNamespace(done=lambda: False)  # a running loop that cycled just now
    p.last_cycle = time.time()
    st.on_reply(40e-6, 1234.5)
    st.last_result = time.time()
    text = render(GuestCollector(p).collect()).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    by = lambda fam, suffix="": {(s.labels.get("guest"), s.name): s.value for s in fams[fam].samples
                                 if s.name.endswith(suffix)}
    assert by("kvmnet_guest_up") == {("quiet", "kvmnet_guest_up"): 0, ("vm1", "kvmnet_guest_up"): 1}
    assert by("kvmnet_guest_ping_requests")[("quiet", "kvmnet_guest_ping_requests_total")] == 0
    assert by("kvmnet_guest_ping_rtt_seconds", "_count") == {("quiet", "kvmnet_guest_ping_rtt_seconds_count"): 0,
                                                              ("vm1", "kvmnet_guest_ping_rtt_seconds_count"): 1}
    assert by("kvmnet_guest_ping_send_errors")[("vm1", "kvmnet_guest_ping_send_errors_total")] == 1
    assert by("kvmnet_guest_last_reply_timestamp_seconds")[("vm1", "kvmnet_guest_last_reply_timestamp_seconds")] \
        == 1234.5
    info = [s.labels for s in fams["kvmnet_guest_info"].samples if s.labels["guest"] == "vm1"][0]
    assert info == {"netns": "ns", "guest": "vm1", "address": "10.0.0.2", "mac": "0a:00:00:00:00:02",
                    "bridge": "br0", "device": "vm1eth0"}


def test_budget_from_scrape_timeout_header():
    assert _budget("10") == 9.5
    assert _budget(None) == 3.0
    assert _budget("0.1") == 0.1
    assert _budget("1e308") == 60.0
    for bad in ("junk", "", "nan", "NaN", "inf", "-inf", "-1", "0", "1" * 400, " "):
        with pytest.raises(ValueError, match="X-Prometheus-Scrape-Timeout-Seconds"):
            _budget(bad)


def test_up_is_never_exported_on_stale_data():
    p = Prober(interval=1.0, timeout=1.0)
    p.set_targets([T("vm1", "10.0.0.2")])
    st = p.states[("ns", "vm1")]
    now = time.time()
    st.on_reply(40e-6, now)

    def up():
        fams = {f.name: f for f in text_string_to_metric_families(render(GuestCollector(p).collect()).decode())}
        return fams["kvmnet_guest_up"].samples[0].value

    assert up() == 0  # the loop never started: no claim
    p._task = SimpleNamespace(done=lambda: False)
    p.last_cycle = now
    assert up() == 1 and p.health() == (True, "ok")
    p.last_cycle = now - 6  # the loop stopped cycling (stalled): > max(3 intervals, 5 s)
    assert up() == 0 and p.health()[0] is False and "stalled" in p.health()[1]
    p.last_cycle = now
    st.last_result = now - 7  # the loop runs but this guest had no result for too long
    assert up() == 0
    p._task = SimpleNamespace(done=lambda: True)  # crashed, waiting for its restart
    st.last_result = now
    assert up() == 0 and p.health() == (False, "prober not running")


def test_guest_rows_cached_and_odd_names_rendered_exactly():
    """The probe collector's cached per-guest templates: '%' and quotes in names come out as they are, and a
    guest that goes away takes its cached row with it."""
    import ipaddress

    from prometheus_client.parser import text_string_to_metric_families

    from kvmnet.exporter.collectors.probe import GuestCollector
    from kvmnet.exporter.exposition import render
    from kvmnet.exporter.prober.engine import Prober
    from kvmnet.exporter.prober.targets import Target

    p = Prober()
    odd = 'vm%d "x"\\'
    p.set_targets([Target(odd, ipaddress.ip_address("10.0.0.1"), "n%s"), Target("b", ipaddress.ip_address("10.0.0.2"))])
    for st in p.states.values():
        st.on_reply(25e-6, 1.5)
    c = GuestCollector(p)
    for _ in range(2):
        fams = {f.name: f for f in text_string_to_metric_families(render(c.collect()).decode())}
    h = fams["kvmnet_guest_ping_rtt_seconds"]
    from kvmnet.exporter.exposition import label_value
    mine = [s for s in h.samples if s.labels["guest"] == label_value(odd)]  # the documented name mapping
    assert len(mine) == 23
    assert {s.labels["netns"] for s in mine} == {"n%s"}
    assert [s.value for s in mine if s.name.endswith("_count")] == [1]
    assert [s.value for s in mine if s.labels.get("le") == "4e-05"] == [1]
    assert [s.value for s in mine if s.labels.get("le") == "2e-05"] == [0]
    p.set_targets([Target("b", ipaddress.ip_address("10.0.0.2"))])
    c.collect()
    assert len(c._keys) == 1
