"""Supervised background tasks: a crash is one log event with the traceback, counted, restarted with backoff; and
the prober's liveness: an unexpected OSError while checking namespaces (a fault injected into the namespace check)
crash-loops the probe loop, which is logged and counted, /healthz-visible, and never leaves a guest up."""
import asyncio
import errno
import ipaddress
import logging
import socket
import time

import pytest

from kvmnet.exporter import tasks
from kvmnet.exporter.prober import engine
from kvmnet.exporter.prober.engine import Prober
from kvmnet.exporter.prober.socket import _Pending
from kvmnet.exporter.prober.targets import Target


async def test_crash_is_logged_with_traceback_counted_and_restarted_with_backoff(caplog):
    runs = []

    async def flaky():
        runs.append(asyncio.get_running_loop().time())
        if len(runs) < 4:
            raise RuntimeError(f"boom {len(runs)}")
        await asyncio.sleep(3600)

    before = tasks.restarts.get("kx-flaky", 0)
    with caplog.at_level(logging.ERROR, logger="kvmnet.tasks"):
        t = tasks.start("kx-flaky", flaky, backoff_min=0.02, backoff_max=0.05)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(runs) >= 4:
                break
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
    assert len(runs) == 4 and tasks.restarts["kx-flaky"] - before == 3
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.05  # doubling, capped
    crashes = [r.getMessage() for r in caplog.records if "event=task_crashed" in r.getMessage()]
    assert len(crashes) == 3 and "task=kx-flaky" in crashes[0] and 'error="RuntimeError: boom 1"' in crashes[0]
    assert "traceback=\"Traceback (most recent call last):" in crashes[0] and "\n" not in crashes[0]


class FakeSocket:
    """IcmpSocket's interface; every echo request is answered after 1 ms."""

    def __init__(self, netns, family, loop, on_result, mode, payload_size, tx_timestamps):
        self.netns, self.family, self.loop, self.on_result, self.mode = netns, family, loop, on_result, "raw"
        self.inode = 1
        self.pending = {}

    def send(self, owner, addr, timeout):
        p = _Pending(owner, addr, 0, self.loop.time() + timeout)
        self.loop.call_later(0.001, self.on_result, p, 0.001)
        return p

    def expire(self, now):
        return None

    def forget(self, p):
        pass

    def close(self):
        pass


async def test_unexpected_oserror_in_the_namespace_check_never_leaves_a_guest_up(monkeypatch, caplog):
    monkeypatch.setattr(engine, "STALE_MIN", 0.3)
    fault = {"on": False}

    def inode(name):
        if fault["on"]:
            raise OSError(errno.EIO, "Input/output error")  # not NetnsGone: nobody expected this one
        return 1

    monkeypatch.setattr(engine.nsmod, "inode", inode)
    p = Prober(interval=0.05, timeout=0.05, socket_factory=FakeSocket)
    p.set_targets([Target("vm1", ipaddress.ip_address("10.0.0.2"), "kxfake")])
    before = tasks.restarts.get("prober", 0)

    def up():
        return p.snapshot()[0][1]

    await p.start()
    try:
        await asyncio.sleep(0.3)
        assert up() and p.health() == (True, "ok")
        with caplog.at_level(logging.ERROR, logger="kvmnet.tasks"):
            fault["on"] = True
            deadline = time.monotonic() + 2
            while up():  # must go down within the stale bound (3 intervals, at least STALE_MIN) + timeout
                assert time.monotonic() < deadline, "guest_up stayed 1 while the prober was crash-looping"
                await asyncio.sleep(0.02)
            assert p.health()[0] is False
        assert tasks.restarts["prober"] > before
        crash = next(r.getMessage() for r in caplog.records if "event=task_crashed" in r.getMessage())
        assert "task=prober" in crash and "Input/output error" in crash and "_check_namespaces" in crash
        fault["on"] = False  # the fault clears: the next restart runs again and the guest comes back
        deadline = time.monotonic() + 5
        while not up():
            assert time.monotonic() < deadline, "the prober did not come back after the fault cleared"
            await asyncio.sleep(0.05)
        assert p.health() == (True, "ok")
    finally:
        await p.stop()


async def test_on_demand_probe_refuses_a_non_finite_budget():
    p = Prober(socket_factory=FakeSocket)
    for budget in (float("nan"), float("inf"), -1.0, 0.0, 1e308):
        with pytest.raises(ValueError, match="budget"):
            await p.probe("10.0.0.2", "kxfake", 1, budget)
    res = await p.probe("10.0.0.2", "kxfake", 2, 0.5)
    assert res.sent == 2 and len(res.rtts) == 2
    assert socket.AF_INET
