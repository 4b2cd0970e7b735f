"""The prober's real loop (scheduling, sending, reply matching with kernel timestamps, expiry, down after N,
on-demand probes, socket failures) without root: the real Prober and IcmpSocket on a fake kernel socket
(tests/unit/fakeicmp.py) that answers echo requests with chosen RTTs, drops, refuses or answers late."""
from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from kvmnet.exporter.prober.engine import Prober
from kvmnet.exporter.prober.state import bucket_index
from kvmnet.exporter.prober.targets import Target

from .fakeicmp import DROP, FOREIGN, LATE, UNREACHABLE, FakeIcmp

INTERVAL, TIMEOUT = 0.05, 0.1


def target(name: str, addr: str) -> Target:
    return Target(name, ipaddress.ip_address(addr), "")


async def until(cond, budget: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + budget
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def run():
    started = []

    async def start(answers, down_after=2, **kw):
        net = FakeIcmp(answers, **kw)
        p = Prober(interval=INTERVAL, timeout=TIMEOUT, down_after=down_after, socket_factory=net.factory)
        await p.start()
        started.append(p)
        return p, net
    yield start
    for p in started:
        await p.stop()


def states(p: Prober) -> dict:
    return {st.target.name: st for st in p.states.values()}


async def test_replies_are_timed_from_kernel_timestamps(run):
    p, net = await run({"10.0.0.1": 50e-6, "fd00::2": 3e-3})
    p.set_targets([target("a", "10.0.0.1"), target("b", "fd00::2")])
    await until(lambda: all(s.replies >= 3 for s in p.states.values()))
    a, b = states(p)["a"], states(p)["b"]
    assert a.up and b.up
    assert a.rtt_sum == pytest.approx(50e-6 * a.replies, rel=1e-6)
    assert a.buckets[bucket_index(50e-6)] == a.replies and b.buckets[bucket_index(3e-3)] == b.replies
    assert a.requests >= a.replies and a.send_errors == 0
    assert sorted(p.sockets()) == [("", "ipv4", "raw"), ("", "ipv6", "raw")]
    snap = {t.name: row for t, *row in p.snapshot()}
    assert snap["a"][0] is True and snap["a"][-1] == a.replies  # up, ..., rtt count


async def test_a_silent_guest_is_never_up_and_its_probes_are_lost(run):
    p, net = await run({"10.0.0.1": 50e-6})
    p.set_targets([target("a", "10.0.0.1"), target("quiet", "10.0.0.9")])
    await until(lambda: states(p)["quiet"].lost_in_row >= 3)
    q = states(p)["quiet"]
    assert not q.up and q.replies == 0 and q.requests >= 3 and q.send_errors == 0


async def test_down_after_n_losses_then_up_again(run):
    p, net = await run({"10.0.0.1": 50e-6}, down_after=3)
    p.set_targets([target("a", "10.0.0.1")])
    await until(lambda: states(p)["a"].up)
    net.answers["10.0.0.1"] = DROP
    st = states(p)["a"]
    await until(lambda: st.lost_in_row >= 1)
    if st.lost_in_row < 3:  # (under load the loop may already be further along)
        assert st.up  # fewer than down_after losses is not down
    await until(lambda: not st.up)
    assert st.lost_in_row == 3
    net.answers["10.0.0.1"] = 50e-6
    await until(lambda: st.up)


async def test_late_replies_count_as_lost(run):
    p, net = await run({"10.0.0.1": LATE}, late=TIMEOUT * 10)
    p.set_targets([target("a", "10.0.0.1")])
    st = states(p)["a"]
    await until(lambda: st.lost_in_row >= 3)
    await asyncio.sleep(TIMEOUT * 12)  # the late replies arrive now: ignored, not counted
    assert st.replies == 0 and not st.up


async def test_send_errors_are_requests_and_losses(run):
    p, net = await run({"10.0.0.1": UNREACHABLE})
    p.set_targets([target("a", "10.0.0.1")])
    st = states(p)["a"]
    await until(lambda: st.send_errors >= 3)
    assert st.requests >= st.send_errors and not st.up and st.last_error == "No route to host"


async def test_other_processes_replies_are_ignored(run):
    p, net = await run({"10.0.0.1": FOREIGN})
    p.set_targets([target("a", "10.0.0.1")])
    st = states(p)["a"]
    await until(lambda: st.lost_in_row >= 2)
    assert st.replies == 0


async def test_a_socket_that_cannot_be_opened_is_reported_and_retried(run):
    net_error = PermissionError(1, "Operation not permitted")
    p, net = await run({"10.0.0.1": 50e-6})
    net.fail_open = net_error
    p.set_targets([target("a", "10.0.0.1")])
    st = states(p)["a"]
    await until(lambda: st.send_errors >= 2)
    assert p.unavailable() == {("", socket.AF_INET): "[Errno 1] Operation not permitted"}
    net.fail_open = None
    await until(lambda: st.up, budget=5.0)  # reopened after RETRY_OPEN
    assert p.unavailable() == {}


async def test_on_demand_probe_shares_the_socket(run):
    p, net = await run({"10.0.0.1": 200e-6, "10.0.0.2": DROP})
    ok = await p.probe("10.0.0.1", count=3, budget=0.6)
    assert ok.success and ok.sent == 3 and ok.rtts == pytest.approx([200e-6] * 3, rel=1e-6)
    lost = await p.probe("10.0.0.2", count=2, budget=0.3)
    assert not lost.success and lost.sent == 2 and not lost.errors
    assert all(not s.pending for s in p._sockets.values())  # nothing left behind


async def test_targets_replaced_keep_counters_of_those_that_stay(run):
    p, net = await run({"10.0.0.1": 50e-6, "10.0.0.2": 50e-6})
    p.set_targets([target("a", "10.0.0.1"), target("b", "10.0.0.2")])
    await until(lambda: states(p)["a"].replies >= 2)
    before = states(p)["a"].replies
    p.set_targets([target("a", "10.0.0.1")])
    assert list(states(p)) == ["a"] and states(p)["a"].replies >= before
    p.set_targets([])
    await until(lambda: p._sockets == {})  # pruned once no target uses them and nothing is in flight


async def test_guest_prober_discovers_probes_and_renders(tmp_path):
    """GuestProber's lifecycle: discovery over the service's netlink source (the fake kernel's recorded dumps,
    with the neighbour entry pointed at the MAC learned on vm0), the prober loop on the fake ICMP socket, the
    probe collector, reconfigure without discovery, stop."""
    from kvmnet.common import rtnl
    from kvmnet.exporter import service as svc
    from kvmnet.exporter.collectors.probe import GuestCollector
    from kvmnet.exporter.config import Config
    from kvmnet.exporter.exposition import render
    from kvmnet.exporter.prober.engine import GuestProber
    from kvmnet.exporter.sources.netlink import NetlinkSource

    from .fakenetlink import FakeKernel, recorded

    dumps = recorded()
    neigh = bytearray(dumps[(rtnl.RTM_GETNEIGH, 0)])
    old = bytes.fromhex("0a0000000909")
    assert neigh.count(old) == 1
    neigh[neigh.index(old):neigh.index(old) + 6] = bytes.fromhex("0a0000000005")
    dumps[(rtnl.RTM_GETNEIGH, 0)] = bytes(neigh)
    kernel = FakeKernel(dumps)
    src = NetlinkSource("", socket_factory=kernel.factory)
    net = FakeIcmp({"10.0.0.9": 30e-6})
    gp = GuestProber(Prober(socket_factory=net.factory), render=GuestCollector)
    gp.source_for = lambda ns: src
    try:
        await gp.start(svc.Loaded(Config(), None, [""], []))
        await until(lambda: any(s.up for s in gp.prober.states.values()))
        [t] = gp.prober.targets()
        assert (t.name, str(t.address), t.mac, t.bridge, t.device, t.source) == \
            ("vm0", "10.0.0.9", "0a:00:00:00:00:05", "br0", "vm0", "discovery")
        text = render([f for c in gp.collectors() for f in c.collect()]).decode()
        assert 'kvmnet_guest_up{netns="",guest="vm0"} 1' in text
        gp.reconfigure(svc.Loaded(Config(probe={"discover": False}), None, [""], []))
        assert gp.prober.targets() == []
    finally:
        await gp.stop()
        src.close()
        kernel.close()
