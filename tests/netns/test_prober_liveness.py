"""The prober's liveness against real guests and real ICMP sockets: an unexpected OSError in the namespace check
(injected into kvmnet.common.netns.inode) crash-loops the probe loop; it is logged with its traceback, counted and
restarted, /health says so, and a guest that dies meanwhile is never exported up. A /probe with a NaN scrape
timeout is refused and the background loop keeps cycling."""
import asyncio
import errno
import logging
import time

import pytest

from kvmnet.exporter import tasks
from kvmnet.exporter.prober import engine
from kvmnet.exporter.prober.engine import Prober
from tests.harness import ip

pytestmark = pytest.mark.netns


def up(p: Prober, name: str) -> bool:
    return next(row[1] for row in p.snapshot() if row[0].name == name)


async def test_crash_loop_is_logged_counted_restarted_and_never_keeps_a_dead_guest_up(lab, monkeypatch, caplog):
    lb = lab(2)
    monkeypatch.setattr(engine, "STALE_MIN", 1.0)
    real_inode = engine.nsmod.inode
    fault = {"on": False}

    def inode(name):
        if fault["on"]:
            raise OSError(errno.EIO, "Input/output error")
        return real_inode(name)

    monkeypatch.setattr(engine.nsmod, "inode", inode)
    p = Prober(interval=0.2, timeout=0.3)
    p.set_targets([lb.target(1), lb.target(2)])
    before = tasks.restarts.get("prober", 0)
    await p.start()
    try:
        deadline = time.monotonic() + 5
        while not (up(p, "g1") and up(p, "g2")):
            assert time.monotonic() < deadline, "guests never up"
            await asyncio.sleep(0.05)
        with caplog.at_level(logging.ERROR, logger="kvmnet.tasks"):
            fault["on"] = True
            ip("-n", lb.host, "link", "del", "vg1")  # g1 dies while the prober is broken
            t0 = time.monotonic()
            while up(p, "g1"):
                assert time.monotonic() - t0 < 3, "a dead guest stayed up while the prober crash-looped"
                await asyncio.sleep(0.05)
            assert not up(p, "g2")  # no claim about anyone on stale data
            assert p.health()[0] is False
        assert tasks.restarts["prober"] > before
        crash = [r.getMessage() for r in caplog.records if "event=task_crashed" in r.getMessage()]
        assert crash and "task=prober" in crash[0] and "Input/output error" in crash[0] and "Traceback" in crash[0]
        fault["on"] = False
        deadline = time.monotonic() + 8
        while not up(p, "g2"):
            assert time.monotonic() < deadline, "the prober did not recover"
            await asyncio.sleep(0.1)
        assert not up(p, "g1") and p.health() == (True, "ok")
    finally:
        await p.stop()


async def test_nan_scrape_timeout_never_stalls_the_background_loop(lab):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    lb = lab(1)
    gp = engine.GuestProber(Prober(interval=0.2, timeout=0.3))
    gp.watched = ["", lb.host]
    gp.prober.set_targets([lb.target(1)])
    await gp.prober.start()
    app = web.Application()
    app.router.add_get("/probe", gp.handle_probe)
    try:
        async with TestClient(TestServer(app)) as client:
            for bad in ("nan", "inf", "-1", "1e999", "", "junk"):
                r = await client.get("/probe", params={"target": "10.200.1.1", "netns": lb.host},
                                     headers={"X-Prometheus-Scrape-Timeout-Seconds": bad})
                assert r.status == 400, bad
            await asyncio.sleep(0.5)
            requests = next(row[2] for row in gp.prober.snapshot())
            ip("-n", lb.host, "link", "del", "vg1")
            t0 = time.monotonic()
            while up(gp.prober, "g1"):
                assert time.monotonic() - t0 < 3
                await asyncio.sleep(0.05)
            assert next(row[2] for row in gp.prober.snapshot()) > requests  # still sending
            assert gp.prober.health() == (True, "ok")
    finally:
        await gp.prober.stop()
