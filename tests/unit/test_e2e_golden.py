"""The unprivileged whole-exporter golden tier (node_exporter's e2e-output.txt): the recorded netlink dumps (through
the fake kernel's sockets, tests/unit/fakenetlink.py) and a prober with deterministic RTTs go through the real
Service, collectors, scrape and aiohttp app; GET /metrics is diffed against tests/unit/golden/e2e-output.prom.

Regenerate after an intended change of the output (a new family, a changed HELP):

    KVMNET_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_e2e_golden.py

The skip rule (SKIP, below): sample lines of series whose value depends on the machine or the moment are left out
of the comparison; their `# HELP` and `# TYPE` lines stay, so the family list is still checked. Those are the
process_* metrics, the collector durations, the reload timestamp, the prober's heartbeat timestamp and
kvmnet_build_info (its python and revision labels).
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmnet.common import rtnl
from kvmnet.exporter import service as svc
from kvmnet.exporter.collectors.probe import GuestCollector
from kvmnet.exporter.config import Config
from kvmnet.exporter.prober.engine import GuestProber, Prober
from kvmnet.exporter.prober.targets import Target
from kvmnet.exporter.sources.identity import GuestDirectory
from kvmnet.exporter.sources.netlink import DUMP_ATTEMPTS, NetlinkSource
from kvmnet.exporter.web import SERVICE_KEY, create_app

from .fakeicmp import FakeIcmp
from .fakenetlink import FakeKernel
from .goldenfile import GOLDEN

# Sample lines (not HELP/TYPE) that cannot be deterministic. Documented in docs/metrics.md too.
SKIP = re.compile(r"^(process_\w+|kvmnet_scrape_collector_duration_seconds|"
                  r"kvmnet_config_last_reload_success_timestamp_seconds|kvmnet_build_info|"
                  r"kvmnet_prober_last_cycle_timestamp_seconds)[{ ]")
EMPTY_PROC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "empty-proc")  # no such dir: empty
T0 = 1_767_225_600.0  # the prober's fixed "now" for last-reply timestamps: 2026-01-01T00:00:00Z

# Three guests: vm0 answers with known RTTs, vm1 never answered (down from the start), vm2 answered then lost 3.
GUESTS = [Target("vm0", ipaddress.ip_address("10.0.0.10"), "", mac="0a:00:00:00:00:01", bridge="br0", device="vm0",
                 source="config"),
          Target("vm1", ipaddress.ip_address("10.0.0.11"), "", mac="0a:00:00:00:00:02", bridge="br0", device="vm1",
                 source="config"),
          Target("vm2", ipaddress.ip_address("fd00::12"), "", source="config")]
RTTS = {"vm0": [18e-6, 25e-6, 25e-6, 90e-6, 1.5e-3], "vm2": [40e-6]}


class DeterministicProber(GuestProber):
    """The real GuestProber and Prober state, collector and exposition, with the loop replaced by fixed results."""

    async def start(self, loaded=None) -> None:
        if loaded is not None:
            self.reconfigure(loaded)
        p = self.prober
        with p.lock:
            for st in p._order:
                for rtt in RTTS.get(st.target.name, []):
                    st.requests += 1
                    st.on_reply(rtt, T0)
                if st.target.name == "vm2":
                    for _ in range(3):
                        st.requests += 1
                        st.on_loss(p.down_after)
                if st.target.name == "vm1":
                    st.requests, st.send_errors = 4, 1
                    st.on_loss(p.down_after)
        # Alive as health() and snapshot() judge it (guest_up is never 1 on stale data): a loop that has just
        # cycled, and a fresh result for every guest. The heartbeat's value is the one non-deterministic number.
        now = time.time()
        p.last_cycle = now
        p._task = _Running()
        with p.lock:
            for st in p._order:
                st.last_result = now
        p._loop = asyncio.get_running_loop()
        p.socket_for("", socket.AF_INET)  # a real IcmpSocket on the fake ICMP kernel
        p._unavailable[("", socket.AF_INET6)] = "not permitted"

    async def stop(self) -> None:
        self.prober._task = None
        await self.prober.stop()


class _Running:
    """Stands for the prober's task: running."""

    def done(self) -> bool:
        return False


def make_app(kernel: FakeKernel):
    settings = svc.Settings(enabled={c: True for c in svc.COLLECTORS})
    loaded = svc.Loaded(Config(), None, [""], list(GUESTS))
    # /probe runs the real on-demand path on a fake ICMP socket: vm0 answers in 200 us, the rest never.
    icmp = FakeIcmp({"10.0.0.10": 200e-6})
    prober = DeterministicProber(Prober(interval=1.0, timeout=1.0, down_after=3, socket_factory=icmp.factory),
                                 render=GuestCollector)
    service = svc.Service(settings, loaded, prober=prober,
                          source_factory=lambda ns: NetlinkSource(ns, socket_factory=kernel.factory))
    # The identity collector on an empty /proc and no libvirt: no machine's processes in the output, but its
    # families (kvmnet_guest_state) are listed.
    service.identity = prober.directory = GuestDirectory(proc=EMPTY_PROC, libvirt_dir=EMPTY_PROC, background=False)
    return create_app(service, probe_handler=prober.handle_probe)


def comparable(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if not SKIP.match(line))


@pytest.fixture
async def client(aiohttp_client):
    kernel = FakeKernel()
    app = make_app(kernel)
    # The first dump, with the FDB, before any scrape: otherwise whether the bridge or the fdb collector's thread
    # comes first decides between one resync and two (links, then links and FDB).
    app[SERVICE_KEY].source("").snapshot()
    c = await aiohttp_client(app)
    c.kernel = kernel
    yield c
    kernel.close()


async def scrape(client) -> str:
    r = await client.get("/metrics")
    assert r.status == 200
    return await r.text()


async def test_metrics_match_the_golden_file(client):
    await scrape(client)
    body = await scrape(client)  # the second scrape: counters only, the steady state
    got = comparable(body)
    if os.environ.get("KVMNET_UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text(), "/metrics changed; KVMNET_UPDATE_GOLDEN=1 regenerates the golden file"
    for name in ("process_cpu_seconds_total", "kvmnet_scrape_collector_duration_seconds", "kvmnet_build_info"):
        assert re.search(rf"^{name}[{{ ]", body, re.M), name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (scripts/bootstrap.sh)")
async def test_promtool_check_metrics(client, tmp_path):
    await scrape(client)
    body = await scrape(client)
    for text in (body, GOLDEN.read_text()):
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_golden_parses_with_client_python():
    fams = {f.name: f for f in text_string_to_metric_families(GOLDEN.read_text())}
    assert fams["kvmnet_guest_ping_rtt_seconds"].type == "histogram"
    ups = {s.labels["guest"]: s.value for s in fams["kvmnet_guest_up"].samples}
    assert ups == {"vm0": 1, "vm1": 0, "vm2": 0}


async def test_a_failing_dump_fails_its_collector_and_the_rest_is_served(client):
    await scrape(client)
    client.kernel.script[rtnl.RTM_GETSTATS] = ["intr"] * DUMP_ATTEMPTS
    body = await scrape(client)
    assert 'kvmnet_scrape_collector_success{collector="bridge",netns=""} 0' in body
    assert 'kvmnet_scrape_collector_success{collector="fdb",netns=""} 1' in body
    assert "kvmnet_port_receive_bytes_total" not in body.split("# TYPE kvmnet_port_receive_bytes_total")[-1][:1]
    assert 'kvmnet_guest_up{netns="",guest="vm0"} 1' in body
    body = await scrape(client)  # the next scrape is whole again, and says what happened
    assert 'kvmnet_scrape_collector_success{collector="bridge",netns=""} 1' in body
    assert f'kvmnet_netlink_dump_interrupted_total{{netns=""}} {DUMP_ATTEMPTS}' in body
    assert 'kvmnet_netlink_errors_total{netns=""} 1' in body
    assert 'kvmnet_netlink_resyncs_total{netns=""} 1' in body


async def test_probe_endpoint(client):
    r = await client.get("/probe", params={"target": "10.0.0.10", "count": "2"},
                         headers={"X-Prometheus-Scrape-Timeout-Seconds": "1.5"})
    assert r.status == 200
    got = {f.name: f for f in text_string_to_metric_families(await r.text())}
    assert got["probe_success"].samples[0].value == 1
    assert got["probe_icmp_packets_received"].samples[0].value == 2
    assert {s.labels["stat"]: s.value for s in got["probe_icmp_rtt_seconds"].samples} == \
        pytest.approx({"min": 200e-6, "avg": 200e-6, "max": 200e-6}, rel=1e-6)
    r = await client.get("/probe", params={"target": "10.0.0.99", "count": "1"},
                         headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.7"})
    assert "probe_success 0" in await r.text()
    r = await client.get("/probe", params={"target": "not-an-ip"})
    assert r.status == 400 and "target" in await r.text()
