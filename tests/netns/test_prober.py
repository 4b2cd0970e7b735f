"""The prober against light guests (a namespace + veth on a bridge each), built here with `ip`.

Truth comes from the witnesses: the `tc netem` settings we impose and fping, never from kvmnet itself.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import statistics
import subprocess
import sys
import time

import pytest

from kvmnet.exporter.prober import engine
from kvmnet.exporter.prober import targets as guests
from kvmnet.exporter.prober.engine import Prober
from kvmnet.exporter.prober.socket import ProbeUnavailable, open_icmp_socket
from kvmnet.exporter.prober.targets import Target
from tests.conftest import delete_netns
from tests.harness import ip

pytestmark = pytest.mark.netns


async def run_for(prober: Prober, seconds: float) -> list:
    """Probe for a while; returns the sockets the prober had open (they are closed by stop())."""
    await prober.start()
    try:
        await asyncio.sleep(seconds)
        return prober.sockets()
    finally:
        await prober.stop()


def state(prober: Prober, name: str):
    return next(s for s in prober.states.values() if s.target.name == name)


async def test_up_and_sane_rtt_ipv4_and_ipv6(lab):
    lb = lab(2)
    p = Prober(interval=0.1, timeout=1.0)
    p.set_targets([lb.target(1), lb.target(2), lb.target(1, v6=True)])
    # fping at the same time, so both see the same machine (tests run beside other work on 2 cores).
    socks, ref = await asyncio.gather(run_for(p, 2.5), asyncio.to_thread(lb.fping_p50, 1, 20, 100))
    for name in ("g1", "g2", "g1v6"):
        st = state(p, name)
        assert st.up, name
        assert st.requests >= 15 and st.replies >= st.requests - 2, (name, st.requests, st.replies)
        med = statistics.median(st.recent)
        # Same goal as the benchmark: within 2x fping's p50 + 50 us, and not absurdly small either.
        assert 0 < med <= 2 * ref + 50e-6, (name, med, ref)
    assert socks == [(lb.host, "ipv4", "raw"), (lb.host, "ipv6", "raw")]


async def test_datagram_mode_when_ping_group_range_allows(lab):
    lb = lab(1)
    subprocess.run(["ip", "netns", "exec", lb.host, "sysctl", "-qw", "net.ipv4.ping_group_range=0 0"], check=True)
    p = Prober(interval=0.1, timeout=1.0, mode="dgram")
    p.set_targets([lb.target(1), lb.target(1, v6=True)])
    socks = await run_for(p, 1.5)
    assert [m for _, _, m in socks] == ["dgram", "dgram"]
    for name in ("g1", "g1v6"):
        st = state(p, name)
        assert st.up and st.replies >= st.requests - 2 >= 10, (name, st.requests, st.replies)


def test_neither_mode_allowed_says_what_to_grant(netns):
    # Raw refused (mode forced), datagram refused (a fresh namespace's ping_group_range is "1 0").
    with pytest.raises(ProbeUnavailable) as exc:
        open_icmp_socket(netns, 2, mode="dgram")
    msg = str(exc.value)
    assert "\n" not in msg and "CAP_NET_RAW" in msg and "net.ipv4.ping_group_range" in msg


def test_without_cap_net_raw_one_line_from_a_real_unprivileged_process(lab):
    """A process without CAP_NET_RAW falls back to datagram sockets, and says what to grant when those fail."""
    lb = lab(1)
    code = ("import asyncio,ipaddress,logging,sys\n"
            "logging.basicConfig(level=logging.WARNING,stream=sys.stdout,format='%(message)s')\n"
            "from kvmnet.exporter.prober.engine import Prober\nfrom kvmnet.exporter.prober.targets import Target\n"
            "async def m():\n"
            f" p=Prober(interval=0.1,timeout=0.3); p.set_targets([Target('g1',ipaddress.ip_address('10.200.1.1'),'{lb.host}')])\n"
            " await p.start(); await asyncio.sleep(1); socks=p.sockets(); await p.stop()\n"
            " st=list(p.states.values())[0]; print('RESULT', socks, st.replies, st.send_errors)\n"
            "asyncio.run(m())\n")
    cmd = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw", sys.executable, "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    lines = [l for l in out.splitlines() if "probe_socket_failed" in l]
    assert len(lines) == 1 and "CAP_NET_RAW" in lines[0] and "ping_group_range" in lines[0], out
    assert "RESULT [] 0" in out
    subprocess.run(["ip", "netns", "exec", lb.host, "sysctl", "-qw", "net.ipv4.ping_group_range=0 0"], check=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    assert f"RESULT [('{lb.host}', 'ipv4', 'dgram')]" in out and "probe_socket_failed" not in out, out


def has_netem() -> bool:
    return subprocess.run(["modprobe", "-q", "sch_netem"], capture_output=True).returncode == 0 or \
        os.path.isdir("/sys/module/sch_netem")


def netem(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", *args],
                   check=True)


def nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True)


def nft_counters(ns: str) -> dict[str, int]:
    """Packets counted by the named counters of table inet kt (the witness's own count)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "counters"], capture_output=True,
                         text=True, check=True).stdout
    import json
    return {c["counter"]["name"]: c["counter"]["packets"] for c in json.loads(out)["nftables"] if "counter" in c}


async def test_loss_20_percent(lab):
    """20% of echo requests dropped in the guest: by netem where the kernel has it, else by nftables
    (`numgen random mod 100 < 20`, CONFIG_NET_SCH_NETEM is off on these machines), with nft's counters as an
    exact witness of what was dropped."""
    lb = lab(2)
    ns = lb.guests["g1"]
    nft(ns, """table inet kt {
        counter seen {}
        counter dropped {}
        chain in {
            type filter hook input priority 0;
            icmp type echo-request counter name seen
            icmp type echo-request numgen random mod 100 < 20 counter name dropped drop
        }
    }
    """)
    p = Prober(interval=0.01, timeout=0.3)  # ~1000 probes: binomial sd 1.3 points
    p.set_targets([lb.target(1), lb.target(2)])
    await run_for(p, 10.5)
    lossy, clean = state(p, "g1"), state(p, "g2")
    assert lossy.requests >= 900
    ratio = 1 - lossy.replies / lossy.requests
    assert abs(ratio - 0.20) <= 0.05, ratio
    seen = nft_counters(ns)
    assert abs(lossy.requests - seen["seen"]) <= 1 and abs((lossy.requests - lossy.replies) - seen["dropped"]) <= 1, \
        (lossy.requests, lossy.replies, seen)
    assert clean.replies >= clean.requests - 1
    assert lossy.up  # 3 losses in a row happen (0.8%) but a reply brings it back up


@pytest.fixture
def delayed_guest(lab):
    """Guest g1 answering 5 ms late: netem where available, else a user-space responder (kernel replies off)."""
    lb = lab(1)
    ns = lb.guests["g1"]
    if has_netem():
        netem(ns, "delay", "5ms")
        yield lb
        return
    for key in ("net.ipv4.icmp_echo_ignore_all=1", "net.ipv6.icmp.echo_ignore_all=1"):
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", key], check=True)
    here = os.path.dirname(__file__)
    # Real-time priority: on a busy machine a normal process wakes up milliseconds late, and the witness with it.
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "chrt", "-f", "10", sys.executable,
                             os.path.join(here, "delay_responder.py"), "0.005"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield lb
    finally:
        proc.kill()
        proc.wait()


async def test_delay_5ms_p50(delayed_guest):
    lb = delayed_guest
    p = Prober(interval=0.02, timeout=1.0)
    p.set_targets([lb.target(1), lb.target(1, v6=True)])
    _, ref = await asyncio.gather(run_for(p, 3.0), asyncio.to_thread(lb.fping_p50, 1, 50, 50))
    assert abs(ref - 0.005) <= 0.0005, ref  # the witness agrees with the setting
    for name in ("g1", "g1v6"):
        med = statistics.median(state(p, name).recent)
        assert abs(med - 0.005) <= 0.0005, (name, med, ref)


async def test_other_pingers_do_not_disturb_counts(lab):
    """fping flooding the same guests, and a second kvmnet prober (another raw socket) in the same namespace."""
    lb = lab(3)
    ts = [lb.target(i) for i in (1, 2, 3)]
    other = subprocess.Popen(["ip", "netns", "exec", lb.host, "fping", "-l", "-p", "5", "-q",
                              *(str(t.address) for t in ts)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        a = Prober(interval=0.05, timeout=0.5)
        b = Prober(interval=0.03, timeout=0.5)
        a.set_targets(ts)
        b.set_targets(ts)
        await a.start()
        await b.start()
        await asyncio.sleep(3.0)
        await a.stop()
        await b.stop()
    finally:
        other.terminate()
        other.wait()
    for p in (a, b):
        for t in ts:
            st = state(p, t.name)
            # Every request answered once, nothing else counted (the last may still be in flight at stop).
            assert st.requests - 1 <= st.replies <= st.requests, (t.name, st.requests, st.replies)
            assert st.requests >= 50


async def test_unreachable_and_unroutable(lab):
    lb = lab(1)
    p = Prober(interval=0.1, timeout=0.3, down_after=3)
    p.set_targets([lb.target(1),
                   Target("nobody", ipaddress.ip_address("10.200.9.9"), lb.host),        # on-link, no one there
                   Target("noroute", ipaddress.ip_address("192.0.2.1"), lb.host),        # no route at all
                   Target("noroute6", ipaddress.ip_address("2001:db8::1"), lb.host)])
    await run_for(p, 1.5)
    nobody, noroute, noroute6 = state(p, "nobody"), state(p, "noroute"), state(p, "noroute6")
    assert not nobody.up and nobody.replies == 0 and nobody.requests >= 10
    for st in (noroute, noroute6):
        assert not st.up and st.requests >= 10 and st.send_errors == st.requests
    assert state(p, "g1").up


async def test_guest_vanishing_is_down_within_5s(lab):
    lb = lab(2)
    p = Prober(interval=1.0, timeout=1.0)
    p.set_targets([lb.target(1), lb.target(2)])
    await p.start()
    try:
        await asyncio.sleep(2.5)
        assert state(p, "g1").up
        gone = time.monotonic()
        # The guest drops off the bridge as a dead QEMU's tap does (deleting its namespace instead would free
        # the veth later, in the kernel's asynchronous namespace cleanup, and time that too).
        ip("-n", lb.host, "link", "del", "vg1")
        while state(p, "g1").up and time.monotonic() - gone < 10:
            await asyncio.sleep(0.05)
        took = time.monotonic() - gone
    finally:
        await p.stop()
    assert not state(p, "g1").up and took <= 5.0, took
    assert state(p, "g2").up


async def test_namespace_deleted_under_the_prober_and_back(lab, caplog):
    lb = lab(1)
    p = Prober(interval=0.1, timeout=0.3)
    p.set_targets([lb.target(1)])
    await p.start()
    try:
        await asyncio.sleep(1.0)
        assert state(p, "g1").up
        delete_netns(lb.host)
        await asyncio.sleep(1.5)
        st = state(p, "g1")
        assert not st.up and st.send_errors >= 5
        assert p.sockets() == [] and (lb.host, 2) in p.unavailable()
        gone_logs = [r for r in caplog.records if "netns_gone" in r.getMessage()]
        assert len(gone_logs) == 1, [r.getMessage() for r in gone_logs]
        # It comes back under the same name (a fresh namespace): picked up with no restart.
        ip("netns", "add", lb.host)
        ip("-n", lb.host, "link", "set", "lo", "up")
        ip("-n", lb.host, "link", "add", "br0", "type", "bridge")
        ip("-n", lb.host, "addr", "add", "10.200.0.1/16", "dev", "br0")
        ip("-n", lb.host, "link", "set", "br0", "up")
        ip("-n", lb.host, "link", "add", "vg1", "type", "veth", "peer", "name", "eth0", "netns", lb.guests["g1"])
        ip("-n", lb.host, "link", "set", "vg1", "master", "br0", "up")
        ns = lb.guests["g1"]
        ip("-n", ns, "addr", "add", "10.200.1.1/16", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        back = time.monotonic()
        while not state(p, "g1").up and time.monotonic() - back < 5:
            await asyncio.sleep(0.05)
        assert state(p, "g1").up
        assert p.sockets() == [(lb.host, "ipv4", "raw")]
    finally:
        await p.stop()


async def test_targets_replaced_live_keep_counters(lab):
    lb = lab(3)
    p = Prober(interval=0.05, timeout=0.3)
    p.set_targets([lb.target(1), lb.target(2)])
    await p.start()
    try:
        await asyncio.sleep(1.0)
        before = state(p, "g1").requests
        p.set_targets([lb.target(1), lb.target(3)])
        await asyncio.sleep(1.0)
        assert state(p, "g1").requests > before
        assert {s.target.name for s in p.states.values()} == {"g1", "g3"}
        assert state(p, "g3").up
    finally:
        await p.stop()


async def test_discovery_joins_learned_macs_with_neighbours(lab, monkeypatch):
    lb = lab(2)
    # Light guests sit on veth ports; discovery looks at tap ports (and ports the identity source names).
    monkeypatch.setattr(guests, "TAP_KINDS", ("tap", "tun", "veth"))
    # The guests talk to the host once (what a booting guest does with its gateway); g2 stays silent.
    subprocess.run(["ip", "netns", "exec", lb.guests["g1"], "ping", "-c1", "-W1", "10.200.0.1"], check=True,
                   capture_output=True)
    mac = subprocess.run(["ip", "-n", lb.guests["g1"], "-br", "link", "show", "eth0"], capture_output=True,
                         text=True).stdout.split()[2]
    found = guests.discover_netns(lb.host)
    assert [(t.name, str(t.address), t.mac, t.bridge, t.device) for t in found] == \
        [("vg1", "10.200.1.1", mac, "br0", "vg1")]


async def test_probe_handler_on_demand(lab):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from prometheus_client.parser import text_string_to_metric_families

    lb = lab(1)
    gp = engine.GuestProber(Prober())
    gp.watched = ["", lb.host]  # /probe only probes from watched namespaces
    app = web.Application()
    app.router.add_get("/probe", gp.handle_probe)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/probe", params={"target": "10.200.1.1", "netns": lb.host, "count": "5"},
                             headers={"X-Prometheus-Scrape-Timeout-Seconds": "2"})
        assert r.status == 200
        fams = {f.name: f for f in text_string_to_metric_families(await r.text())}
        assert fams["probe_success"].samples[0].value == 1
        assert fams["probe_icmp_packets_received"].samples[0].value == 5
        assert fams["probe_duration_seconds"].samples[0].value < 1.5
        r = await client.get("/probe", params={"target": "10.200.9.9", "netns": lb.host, "count": "2"},
                             headers={"X-Prometheus-Scrape-Timeout-Seconds": "1.5"})
        fams = {f.name: f for f in text_string_to_metric_families(await r.text())}
        assert fams["probe_success"].samples[0].value == 0
        assert fams["probe_duration_seconds"].samples[0].value <= 1.2
        assert (await client.get("/probe", params={"target": "nope"})).status == 400
        assert (await client.get("/probe", params={"target": "10.0.0.1", "count": "0"})).status == 400
        assert (await client.get("/probe", params={"target": "10.0.0.1", "netns": "../x"})).status == 403
        assert (await client.get("/probe", params={"target": "10.0.0.1", "netns": "kx-unwatched"})).status == 403
    await gp.stop()
