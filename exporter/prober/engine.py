"""The prober engine: `Prober`, the asyncio loop that sends every target's echo requests on the shared sockets and
answers on-demand probes; and `GuestProber`, its lifecycle in the service (targets from config, lab and discovery;
start, reconfigure on reload, stop).

Scheduling: targets are sent in a fixed order, spread evenly over the interval, in batches at most every 10 ms
(a 1000-guest, 1 s interval run wakes 100 times a second, not 1000). A probe is lost when no reply arrived within
`timeout`; a guest is down after `down_after` consecutive lost probes. Send errors (no route, namespace gone)
count as requests, as send errors and as lost probes: the guest is unreachable from here either way.

"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvmnet.common import netns as nsmod
from kvmnet.common.logfmt import fmt

from .. import tasks
from ..sources.nswatch import NamespaceWatcher
from .packets import FAMILY_NAME, PAYLOAD_SIZE
from .socket import IcmpSocket, IcmpSockets, _Pending
from .state import GuestState
from .targets import DISCOVER_EVERY, LINK_CHECK_EVERY, Discovery, Target

log = logging.getLogger("kvmnet.icmp")

RETRY_OPEN = 1.0  # seconds before trying again to open a socket that failed (namespace gone, not permitted)
TICK = 0.01  # the finest batch spacing of sends, seconds
# Liveness: the loop stamps `last_cycle` at every cycle (at least once per interval, targets or not). Older than
# STALE_CYCLES intervals (and at least STALE_MIN seconds), the prober counts as stalled: /healthz fails and no guest
# is exported as up. A guest whose own last result (reply or loss) is older than that plus its timeout is exported
# as down even while the loop runs: up is never kept on stale data.
STALE_CYCLES = 3
STALE_MIN = 5.0
PROBE_BUDGET_MAX = 60.0  # seconds an on-demand probe may take


class Prober:
    """Background ICMP probing of a replaceable list of targets.

        prober = Prober(interval=1.0, timeout=1.0, down_after=3)
        prober.set_targets([Target("vm1", ip_address("10.0.0.11"), "lab-host")])
        await prober.start(); ...; prober.snapshot(); ...; await prober.stop()
    """

    def __init__(self, interval: float = 1.0, timeout: float = 1.0, down_after: int = 3, mode: str = "auto",
                 payload_size: int = PAYLOAD_SIZE, tx_timestamps: bool = True,
                 socket_factory: Callable[..., Any] = IcmpSocket) -> None:
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.down_after = int(down_after)
        self.mode = mode
        self.payload_size = payload_size
        self.tx_timestamps = tx_timestamps
        self.lock = threading.Lock()  # guards `states` and their counters against the scrape threads
        self.states: dict[tuple[str, str], GuestState] = {}
        self._order: list[GuestState] = []
        self._sockets = IcmpSockets(socket_factory)  # the service lends its own (use_sockets)
        self._own_sockets = True
        self._unavailable: dict[tuple[str, int], str] = {}  # (netns, family) -> why; logged once
        self._retry_at: dict[tuple[str, int], float] = {}  # (netns, family) -> loop time to try opening again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.sources: dict[str, list[Target]] = {}  # "static", "discovery": merged in that order of precedence
        # Which namespaces are gone or replaced: the service's watcher when it gives us one (use_watcher), else one
        # of our own that the loop polls once a cycle for the namespaces we hold sockets in.
        self.watcher = NamespaceWatcher()
        self._own_watcher = True
        self.watcher.subscribe(self.namespace_changed)
        self.last_cycle = 0.0  # wall-clock time of the loop's last cycle; 0 before the first

    # -- targets -------------------------------------------------------------------------------------------------
    def set_targets(self, targets: Iterable[Any], source: str = "static") -> None:
        """Replace the targets of one source; counters of targets that stay (same netns and name) are kept."""
        self.sources[source] = [Target.of(t) for t in targets]
        self._merge()

    def _merge(self) -> None:
        chosen: dict[tuple[str, str], Target] = {}
        addrs: set[tuple[str, str]] = set()
        for source in sorted(self.sources, key=lambda s: (s != "static", s)):
            for t in self.sources[source]:
                akey = (t.netns, str(t.address))
                if t.key in chosen or akey in addrs:
                    continue  # first one wins: config over lab over discovery
                chosen[t.key] = t
                addrs.add(akey)
        with self.lock:
            states = {}
            # A guest renamed (its identity arrived after discovery named it after its tap) keeps its counters:
            # the state of a target that is going away on the same device and address moves to the new name.
            leaving = {(st.target.netns, st.target.device, st.addr): st for key, st in self.states.items()
                       if key not in chosen and st.target.device}
            for key, t in chosen.items():
                st = self.states.get(key)
                if st is None:
                    st = leaving.pop((t.netns, t.device, str(t.address)), None) if t.device else None
                    if st is not None:
                        st.retarget(t)
                    else:
                        st = GuestState(t)
                elif st.target != t:
                    st.retarget(t)
                states[key] = st
            self.states = states
            # Interleave namespaces so a namespace's sends are spread over the interval too.
            self._order = sorted(states.values(), key=lambda s: (s.target.netns, s.target.name))
        self._wake.set()

    def targets(self) -> list[Target]:
        with self.lock:
            return [s.target for s in self._order]

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.last_cycle = time.time()  # the grace period starts now, not at the epoch
        self._task = tasks.start("prober", self._run)

    def stale_after(self) -> float:
        return max(STALE_CYCLES * self.interval, STALE_MIN)

    def health(self) -> tuple[bool, str]:
        """(running, why not): the task exists and its loop cycled within stale_after()."""
        if self._task is None or self._task.done():
            return False, "prober not running"
        age = time.time() - self.last_cycle
        if age > self.stale_after():
            return False, f"prober stalled: last cycle {age:.1f}s ago"
        return True, "ok"

    async def stop(self) -> None:
        task, self._task = self._task, None
        await tasks.cancel(task)
        if self._own_sockets:
            self._sockets.close_all()  # a lent pool is closed by its owner, the service

    # -- sockets -------------------------------------------------------------------------------------------------
    def socket_for(self, netns: str, family: int) -> IcmpSocket | None:
        """The open socket for (netns, family), opening it if needed; None when it cannot be had (logged once)."""
        key = (netns, family)
        s: IcmpSocket | None = self._sockets.get(key)
        if s is not None:
            return s
        loop = self._loop or asyncio.get_running_loop()
        if loop.time() < self._retry_at.get(key, 0.0):
            return None  # failed a moment ago: not one setns + two socket() calls per target per cycle
        try:
            s = self.socket_factory(netns, family, self._loop or asyncio.get_running_loop(), self._on_result,
                                    self.mode, self.payload_size, self.tx_timestamps)
        except nsmod.NetnsGone as exc:
            self._retry_at[key] = loop.time() + RETRY_OPEN
            self._note_unavailable(key, "netns_gone", str(exc))
            return None
        except OSError as exc:
            self._retry_at[key] = loop.time() + RETRY_OPEN
            self._note_unavailable(key, "probe_socket_failed", str(exc))
            return None
        self._retry_at.pop(key, None)
        self._sockets[key] = s
        if netns:
            try:
                self.watcher.identity(netns)  # seen now that we hold a socket there: its next change is news
            except nsmod.NetnsGone:
                pass  # gone already (or a test's fake namespace): the watcher tells us when it next looks
        if key in self._unavailable:
            del self._unavailable[key]
            _event("probe_socket_opened", netns=netns, family=FAMILY_NAME[family], mode=s.mode, again="true")
        else:
            _event("probe_socket_opened", logging.DEBUG, netns=netns, family=FAMILY_NAME[family], mode=s.mode)
        return s

    def _note_unavailable(self, key: tuple[str, int], name: str, why: str) -> None:
        if self._unavailable.get(key) != why:
            self._unavailable[key] = why
            _event(name, logging.WARNING if name == "netns_gone" else logging.ERROR,
                   netns=key[0], family=FAMILY_NAME[key[1]], error=why)

    @property
    def socket_factory(self) -> Callable[..., Any]:
        assert self._sockets.factory is not None
        return self._sockets.factory

    def use_sockets(self, sockets: IcmpSockets) -> None:
        """Open and keep ICMP sockets in the service's pool (before start). A pool without a factory of its own
        takes ours (the one this Prober was made with)."""
        if sockets.factory is None:
            sockets.factory = self._sockets.factory
        self._sockets.close_all()
        self._sockets, self._own_sockets = sockets, False

    def use_watcher(self, watcher: NamespaceWatcher) -> None:
        """Follow the service's namespace watcher instead of polling one of our own."""
        self.watcher.unsubscribe(self.namespace_changed)
        self.watcher, self._own_watcher = watcher, False
        watcher.subscribe(self.namespace_changed)

    def _check_namespaces(self) -> None:
        """Our own watcher only: look at the namespaces we hold sockets in (the service's watcher polls its own)."""
        if self._own_watcher:
            self.watcher.check({s.netns for s in self._sockets.values() if s.netns})

    def namespace_changed(self, netns: str, ino: int | None) -> None:
        """From the watcher, on any thread: `netns` is gone (ino None) or replaced."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # never started: no sockets
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            self._drop_namespace(netns, ino)
        else:
            loop.call_soon_threadsafe(self._drop_namespace, netns, ino)

    def _drop_namespace(self, netns: str, ino: int | None) -> None:
        """Close our sockets in a namespace deleted (or replaced) under us: an open socket would keep a deleted
        namespace alive, guests and all. They are reopened when the name comes back."""
        why = f"network namespace {netns!r} does not exist" if ino is None else \
            f"network namespace {netns!r} was replaced"
        for key, s in list(self._sockets.items()):
            if s.netns != netns or s.inode == ino:
                continue
            del self._sockets[key]
            s.close()
            for p in list(s.pending.values()):
                self._on_result(p, None)
            s.pending.clear()
            self._note_unavailable(key, "netns_gone", why)

    def _prune(self, order: list[GuestState]) -> None:
        """Forget sockets and failures of (namespace, family) pairs no target uses any more (after a reload)."""
        used = {(st.target.netns, st.family) for st in order}
        for key in [k for k in self._unavailable if k not in used]:
            del self._unavailable[key]
            self._retry_at.pop(key, None)
        for key in [k for k, s in self._sockets.items() if k not in used and not s.pending]:
            self._sockets.pop(key).close()

    def unavailable(self) -> dict[tuple[str, int], str]:
        return dict(self._unavailable)  # a C-level copy: safe from a scrape thread

    # -- the loop ------------------------------------------------------------------------------------------------
    def _on_result(self, p: _Pending, rtt: float | None) -> None:
        owner = p.owner
        if isinstance(owner, GuestState):
            with self.lock:
                if rtt is None:
                    owner.on_loss(self.down_after)
                else:
                    owner.on_reply(rtt, time.time())
        elif not owner.done():
            owner.set_result(rtt)

    def _send(self, st: GuestState) -> None:
        s = self.socket_for(st.target.netns, st.family)
        with self.lock:
            st.requests += 1
        if s is not None:
            try:
                s.send(st, st.addr, self.timeout)
                if st.last_error:
                    st.last_error = ""
                return
            except OSError as exc:
                err = exc.strerror or str(exc)
        else:
            err = self._unavailable.get((st.target.netns, st.family), "no socket")
        with self.lock:
            st.send_errors += 1
            st.on_loss(self.down_after)
        if st.last_error != err:  # once per guest per kind of error
            st.last_error = err
            _event("probe_send_failed", logging.DEBUG if s is None else logging.WARNING, netns=st.target.netns,
                   guest=st.target.name, address=st.addr, error=err)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        order: list[GuestState] = []
        i = 0
        cycle_start = loop.time()
        while True:
            now = loop.time()
            while True:
                if i >= len(order) and now >= cycle_start + (self.interval if order else 0):
                    # A new cycle: pick up target and namespace changes. Cycles follow each other on the
                    # interval's grid (a 10 ms tick may run several 5 ms cycles); after a stall longer than
                    # that, restart at now rather than send the missed cycles in a burst.
                    cycle_start = cycle_start + self.interval if order else now
                    if now - cycle_start > max(self.interval, 5 * TICK):
                        cycle_start = now
                    self._check_namespaces()
                    with self.lock:
                        order = list(self._order)
                    self._prune(order)
                    self.last_cycle = time.time()  # after the cycle's bookkeeping: a crash loop is no heartbeat
                    i = 0
                slot = self.interval / max(len(order), 1)
                while i < len(order) and cycle_start + i * slot <= now:
                    self._send(order[i])
                    i += 1
                if i < len(order) or not order or now < cycle_start + self.interval:
                    break
            nxt = cycle_start + i * slot if i < len(order) else cycle_start + self.interval
            for s in list(self._sockets.values()):
                d = s.expire(now)
                if d is not None and d < nxt:
                    nxt = d
            delay = max(nxt - loop.time(), TICK)
            if order:
                await asyncio.sleep(delay)
            else:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass

    # -- reading -------------------------------------------------------------------------------------------------
    def snapshot(self) -> list[tuple[Target, bool, int, int, int, float, list[int], float, int]]:
        """(target, up, requests, replies, send_errors, last_reply, cumulative buckets, rtt sum, rtt count).

        `up` is only true on fresh data: the loop is alive and this guest had a result within its staleness bound."""
        now = time.time()
        alive = self.health()[0]
        fresh_for = self.stale_after() + self.timeout
        with self.lock:
            out = []
            for st in self._order:
                up = st.up and alive and now - st.last_result <= fresh_for
                out.append((st.target, up, st.requests, st.replies, st.send_errors, st.last_reply,
                            st.cumulative(), st.rtt_sum, sum(st.buckets)))
            return out

    def sockets(self) -> list[tuple[str, str, str]]:
        socks = list(self._sockets.values())  # one C-level copy: the loop thread may add one meanwhile
        return sorted((s.netns, FAMILY_NAME[s.family], s.mode) for s in socks)

    # -- on demand -----------------------------------------------------------------------------------------------
    async def probe(self, address: str, netns: str = "", count: int = 3, budget: float = 3.0) -> ProbeResult:
        """Ping `address` `count` times within `budget` seconds on the shared socket (blackbox-style)."""
        addr = ipaddress.ip_address(address)
        # Checked here as well as in /probe: a NaN deadline in the loop's timer heap stalls every timer after it.
        if not (isinstance(budget, (int, float)) and math.isfinite(budget) and 0 < budget <= PROBE_BUDGET_MAX):
            raise ValueError(f"budget: not a number of seconds in (0, {PROBE_BUDGET_MAX:g}]: {budget!r}")
        if not (isinstance(count, int) and 1 <= count <= 1000):
            raise ValueError(f"count: not from 1 to 1000: {count!r}")
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        start = loop.time()
        result = ProbeResult(sent=0, rtts=[], errors=[])
        # Spread the packets over the first half of the budget and wait for replies until its end.
        gap = min(0.2, budget / 2 / max(count, 1))
        sent: list[tuple[asyncio.Future[float | None], IcmpSocket, _Pending]] = []
        for k in range(count):
            result.sent += 1
            # Asked each time: the background loop may have closed an idle socket or the namespace may be gone.
            s = self.socket_for(netns, family)
            if s is None:
                result.errors.append(self._unavailable.get((netns, family), "no socket"))
                continue
            fut = loop.create_future()
            try:
                sent.append((fut, s, s.send(fut, str(addr), max(start + budget - loop.time(), 0))))
            except OSError as exc:
                result.errors.append(exc.strerror or str(exc))
            if k + 1 < count:
                await asyncio.sleep(gap)
        if sent:
            await asyncio.wait([f for f, _, _ in sent], timeout=max(start + budget - loop.time(), 0))
        for fut, s, p in sent:
            rtt = fut.result() if fut.done() else None
            if rtt is not None:
                result.rtts.append(rtt)
            else:
                s.forget(p)
        result.duration = loop.time() - start
        return result


@dataclass
class ProbeResult:
    sent: int
    rtts: list[float]
    errors: list[str]
    duration: float = 0.0

    @property
    def success(self) -> bool:
        return bool(self.rtts)


def _event(name: str, level: int = logging.INFO, **fields: object) -> None:
    if log.isEnabledFor(level):
        log.log(level, "%s", fmt(name, **fields))


# ---------------------------------------------------------------------------------------------------------------
# What the service runs (exporter/cli.py builds it).

class GuestProber:
    """The prober plus its target sources. The service calls `start(loaded)`, `reconfigure(loaded)` on reload,
    `stop()`, `collectors()`; the web app mounts `handle_probe` on /probe."""

    def __init__(self, prober: Prober | None = None,
                 render: Callable[[Prober, GuestProber], Any] | None = None) -> None:
        self.prober = prober or Prober()
        # (Prober, GuestProber) -> the collector of its kvmnet_guest_* series (collectors/probe.py)
        self.render = render
        self.discovery = Discovery()
        self.discover = True
        self.namespaces: list[str] = []
        self.watched: list[str] = []
        self.directory: Any = None  # the service's GuestDirectory (guest names); None: tap names are used
        self.source_for: Callable[[str], Any] | None = None  # the service's netlink source of a namespace
        self._gens: dict[str, int] = {}  # netns -> last link generation seen
        self._task: asyncio.Task[None] | None = None
        self.target_namespaces: set[str] = set()  # where configured targets are probed from: /probe may too
        self.inflight = 0  # /probe requests being answered
        self.rejected: dict[str, int] = {}  # /probe refusals by reason (http.py)

    def reconfigure(self, loaded: Any) -> None:
        cfg = getattr(getattr(loaded, "config", None), "probe", None)
        if cfg is not None:
            self.prober.interval = cfg.interval
            self.prober.timeout = cfg.timeout
            self.prober.down_after = cfg.down_after
            self.discover = cfg.discover
        self.watched = list(getattr(loaded, "watched", [""]))
        self.namespaces = self.watched if self.discover else []
        targets = list(getattr(loaded, "targets", []))
        self.target_namespaces = {getattr(t, "netns", "") or "" for t in targets}
        self.prober.set_targets(targets)
        if not self.discover:
            self.prober.set_targets([], source="discovery")

    async def start(self, loaded: Any = None) -> None:
        if loaded is not None:
            self.reconfigure(loaded)
        await self.prober.start()
        if self._task is None:
            self._task = tasks.start("discovery", self._discover_loop)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await tasks.cancel(task)
        await self.prober.stop()

    def _links_changed(self) -> bool:
        """Whether a device appeared, vanished or changed in a watched namespace since the last look (netlink
        events, no dump); if so the guest directory rescans /proc and libvirt at once, not at its next ttl."""
        changed = False
        if self.source_for is None:
            return False
        for ns in self.namespaces:
            try:
                gen = self.source_for(ns).links_changed(self._gens.get(ns, -1))
            except Exception:  # noqa: BLE001 - a namespace gone: discovery reports it
                continue
            if gen != self._gens.get(ns):
                self._gens[ns] = gen
                changed = True
        if changed and self.directory is not None:
            self.directory.invalidate()
        return changed

    async def _discover_loop(self) -> None:
        last = float("-inf")
        while True:
            if self.namespaces:
                self.discovery.source_for = self.source_for
                # Every DISCOVER_EVERY seconds, and within LINK_CHECK_EVERY of a link event (a new tap, a
                # macvtap, a tap gone): new guests get their names before their first series is exported.
                changed = await asyncio.to_thread(self._links_changed)
                if changed or time.monotonic() - last >= DISCOVER_EVERY:
                    last = time.monotonic()
                    found = await asyncio.to_thread(self.discovery.run_once, list(self.namespaces), self.directory)
                    self.prober.set_targets(found, source="discovery")
            await asyncio.sleep(LINK_CHECK_EVERY)

    def use_watcher(self, watcher: NamespaceWatcher) -> None:
        self.prober.use_watcher(watcher)

    def use_sockets(self, sockets: IcmpSockets) -> None:
        self.prober.use_sockets(sockets)

    def health(self) -> tuple[bool, str]:
        """For /healthz: the probe loop is running and cycling, and so is discovery."""
        ok, why = self.prober.health()
        if ok and (self._task is None or self._task.done()):
            return False, "discovery not running"
        return ok, why

    def collectors(self) -> list[Any]:
        return [self.render(self.prober, self)] if self.render is not None else []

    async def handle_probe(self, request: Any) -> Any:
        from .http import probe_handler  # http.py imports this module: resolved at call time, no import cycle
        return await probe_handler(request, self.prober, self.watched, owner=self)
