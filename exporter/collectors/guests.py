"""Guest health: the prober's counters as kvmnet_guest_*, target sources (config, lab, discovery), and /probe.

    # HELP kvmnet_guest_up 1 while the guest answers ping; 0 after `down_after` consecutive lost probes.
    # TYPE kvmnet_guest_up gauge
    kvmnet_guest_up{netns="seed-host",guest="vm1"} 1
    kvmnet_guest_ping_rtt_seconds_bucket{netns="seed-host",guest="vm1",le="4e-05"} 118
    kvmnet_guest_info{netns="seed-host",guest="vm1",address="192.168.98.11",mac="0a:e8:4f:c5:6a:16",bridge="br0",device="vm1eth0"} 1

Every target has all its series from the first scrape: a guest that never answers shows up 0 and requests rising.

Discovery (no configuration): in each watched namespace, for each tap port of a bridge (and each port the identity
source names), the MACs learned on it (dynamic FDB entries) joined with the neighbour table of that bridge give
the guest's address. It is passive: a guest is found once the host has a neighbour entry for it, i.e. after it
exchanged traffic with the host (ARP for its gateway, DHCP, any connection). Nothing scans the subnet. Once found,
the probes themselves keep the FDB and neighbour entries fresh. A discovered guest that disappears (its QEMU
died and took the tap away) is kept for `FORGET_AFTER` seconds so it is reported down rather than silently gone.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any, Iterable

from ..exposition import CONTENT_TYPE, MetricFamily, labels, render
from ..sources import icmp
from ..sources.icmp import BUCKETS, Prober, Target

log = logging.getLogger("kvmnet.guests")

DISCOVER_EVERY = 5.0    # seconds between discovery passes
FORGET_AFTER = 300.0    # a discovered guest no longer seen is dropped after this long
TAP_KINDS = ("tap", "tun")
PROBE_COUNT_MAX = 100


class GuestCollector:
    """Renders the prober's state; `collect()` runs in a scrape thread and only copies counters under a lock."""

    name = "probe"
    netns = ""

    def __init__(self, prober: Prober) -> None:
        self.prober = prober

    def collect(self) -> Iterable[MetricFamily]:
        up = MetricFamily("kvmnet_guest_up", "gauge",
                          "1 while the guest answers ping; 0 after down_after consecutive lost probes "
                          "(and before its first reply).")
        rtt = MetricFamily("kvmnet_guest_ping_rtt_seconds", "histogram",
                           "Round-trip time of each echo reply, from kernel send and receive timestamps.")
        req = MetricFamily("kvmnet_guest_ping_requests_total", "counter",
                           "Echo requests attempted, including those the kernel refused to send. "
                           "Loss ratio: 1 - replies/requests.")
        rep = MetricFamily("kvmnet_guest_ping_replies_total", "counter", "Echo replies received in time.")
        err = MetricFamily("kvmnet_guest_ping_send_errors_total", "counter",
                           "Echo requests that could not be sent (no route, namespace gone, no ICMP socket).")
        last = MetricFamily("kvmnet_guest_last_reply_timestamp_seconds", "gauge",
                            "Unix time of the last echo reply; 0 if none yet.")
        info = MetricFamily("kvmnet_guest_info", "gauge",
                            "A probed guest: its address and, where known, MAC, bridge and bridge port (tap).")
        for t, is_up, requests, replies, errors, last_reply, cum, total, count in self.prober.snapshot():
            lbl = labels(netns=t.netns, guest=t.name)
            up.add(lbl, 1 if is_up else 0)
            rtt.add_histogram(lbl, BUCKETS, cum, total, count)
            req.add(lbl, requests)
            rep.add(lbl, replies)
            err.add(lbl, errors)
            last.add(lbl, last_reply)
            info.add(labels(netns=t.netns, guest=t.name, address=str(t.address), mac=t.mac, bridge=t.bridge,
                            device=t.device), 1)
        sock = MetricFamily("kvmnet_probe_socket_up", "gauge",
                            "1 while the prober has its ICMP socket in this namespace and family; 0 when it cannot "
                            "(namespace gone, not permitted: see the log).")
        mode = MetricFamily("kvmnet_probe_socket_info", "gauge",
                            "The prober's ICMP sockets: mode raw (CAP_NET_RAW) or dgram (ping_group_range).")
        for netns, family, m in self.prober.sockets():
            sock.add(labels(netns=netns, family=family), 1)
            mode.add(labels(netns=netns, family=family, mode=m), 1)
        for (netns, fam) in sorted(self.prober.unavailable()):
            sock.add(labels(netns=netns, family=icmp.FAMILY_NAME[fam]), 0)
        return [up, rtt, req, rep, err, last, info, sock, mode]


# ---------------------------------------------------------------------------------------------------------------
# Discovery.

def discover_netns(netns: str, directory: Any = None, source: Any = None) -> list[Target]:
    """Guests behind the bridge ports of one namespace: learned MACs joined with the bridge's neighbours."""
    if source is None:
        from ..sources import netlink
        source = netlink.source_for(netns)
    idents = {}
    if directory is not None:
        try:
            idents = directory.lookup(netns) or {}
        except Exception as exc:  # noqa: BLE001 - names are a nicety; discovery goes on with tap names
            log.debug("event=identity_failed netns=%s error=%r", netns, str(exc))
    snap = source.snapshot(stats=False, fdb=False)
    learned = source.learned_macs_by_port()
    neigh: dict[tuple[str, str], list] = {}
    for n in source.neighbours():
        if n.address.version == 6 and n.address.is_link_local:
            continue  # a link-local address needs an interface scope the prober's namespace cannot name
        neigh.setdefault((n.device, n.mac), []).append(n.address)
    out = []
    for br in snap.bridges:
        for port in br.ports:
            ident = idents.get(port.name)
            if port.kind not in TAP_KINDS and ident is None:
                continue  # uplinks and plain veths: their far side is a LAN, not a guest
            macs = learned.get(port.name, [])
            if ident is not None and getattr(ident, "mac", ""):
                macs = [m for m in macs if m == ident.mac] or macs
            for mac in macs:
                addrs = sorted(neigh.get((br.name, mac), []), key=lambda a: (a.version, a))
                if addrs:
                    name = ident.name if ident is not None else port.name
                    out.append(Target(name, addrs[0], netns, mac, br.name, port.name, "discovery"))
                    break  # one target per port: its first MAC with an address, IPv4 first
    return out


class Discovery:
    """Periodic discovery over the watched namespaces, with a grace period for guests that disappear."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], tuple[Target, float]] = {}
        self.failed: dict[str, str] = {}

    def run_once(self, namespaces: list[str], directory: Any = None) -> list[Target]:
        now = time.monotonic()
        for ns in namespaces:
            try:
                found = discover_netns(ns, directory)
            except Exception as exc:  # noqa: BLE001 - a namespace gone or unreadable: keep what we had
                if self.failed.get(ns) != str(exc):
                    self.failed[ns] = str(exc)
                    log.warning("event=discovery_failed netns=%s error=%r", ns or "-", str(exc))
                continue
            if ns in self.failed:
                del self.failed[ns]
            for t in found:
                old = self.seen.get(t.key)
                if old is None:
                    log.info("event=guest_discovered netns=%s guest=%s address=%s device=%s",
                             ns or "-", t.name, t.address, t.device)
                self.seen[t.key] = (t, now)
        for key, (t, at) in list(self.seen.items()):
            if now - at > FORGET_AFTER or t.netns not in namespaces:
                log.info("event=guest_forgotten netns=%s guest=%s", t.netns or "-", t.name)
                del self.seen[key]
        return [t for t, _ in self.seen.values()]


# ---------------------------------------------------------------------------------------------------------------
# What the service runs (exporter/cli.py calls make_prober()).

class GuestProber:
    """The prober plus its target sources. The service calls `start(loaded)`, `reconfigure(loaded)` on reload,
    `stop()`, `collectors()`; the web app mounts `handle_probe` on /probe."""

    def __init__(self, prober: Prober | None = None) -> None:
        self.prober = prober or Prober()
        self.discovery = Discovery()
        self.discover = True
        self.namespaces: list[str] = []
        self.watched: list[str] = []
        self.directory: Any = None  # the service's GuestDirectory (guest names); None: tap names are used
        self._task: asyncio.Task | None = None

    def reconfigure(self, loaded: Any) -> None:
        cfg = getattr(getattr(loaded, "config", None), "probe", None)
        if cfg is not None:
            self.prober.interval = cfg.interval
            self.prober.timeout = cfg.timeout
            self.prober.down_after = cfg.down_after
            self.discover = cfg.discover
        self.watched = list(getattr(loaded, "watched", [""]))
        self.namespaces = self.watched if self.discover else []
        self.prober.set_targets(getattr(loaded, "targets", []))
        if not self.discover:
            self.prober.set_targets([], source="discovery")

    async def start(self, loaded: Any = None) -> None:
        if loaded is not None:
            self.reconfigure(loaded)
        await self.prober.start()
        if self._task is None:
            self._task = asyncio.create_task(self._discover_loop(), name="kvmnet-discovery")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.prober.stop()

    async def _discover_loop(self) -> None:
        while True:
            if self.namespaces:
                found = await asyncio.to_thread(self.discovery.run_once, list(self.namespaces), self.directory)
                self.prober.set_targets(found, source="discovery")
            await asyncio.sleep(DISCOVER_EVERY)

    def collectors(self) -> list[GuestCollector]:
        return [GuestCollector(self.prober)]

    async def handle_probe(self, request: Any) -> Any:
        return await probe_handler(request, self.prober, self.watched)


def make_prober() -> GuestProber:
    return GuestProber()


# ---------------------------------------------------------------------------------------------------------------
# /probe?target=ADDR[&netns=NS][&count=N]

def _budget(header: str | None, default: float = 3.0) -> float:
    """Seconds this probe may take: Prometheus' scrape timeout minus a margin for the response (blackbox: 0.5 s)."""
    try:
        t = float(header) - 0.5
    except (TypeError, ValueError):
        t = default
    return max(min(t, 60.0), 0.1)


async def probe_handler(request: Any, prober: Prober | None = None, watched: list[str] | None = None) -> Any:
    """Blackbox-style on-demand probe on the prober's shared sockets; its own small exposition."""
    from aiohttp import web

    if prober is None:
        owner = request.app.get("kvmnet_prober") if hasattr(request.app, "get") else None
        prober = owner.prober if isinstance(owner, GuestProber) else owner
        if prober is None:
            raise web.HTTPServiceUnavailable(text="prober not running\n")
    q = request.query
    target = q.get("target", "")
    try:
        address = ipaddress.ip_address(target)
    except ValueError:
        raise web.HTTPBadRequest(text=f"target: not an IP address: {target!r}\n") from None
    named = [n for n in (watched or []) if n]
    netns = q.get("netns", named[0] if len(named) == 1 else "")
    if netns:
        try:
            from ..config import check_netns_name
            check_netns_name(netns)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"netns: {exc}\n") from None
    try:
        count = int(q.get("count", "3"))
        if not 1 <= count <= PROBE_COUNT_MAX:
            raise ValueError
    except ValueError:
        raise web.HTTPBadRequest(text=f"count: not a number from 1 to {PROBE_COUNT_MAX}: {q.get('count')!r}\n") \
            from None
    budget = _budget(request.headers.get("X-Prometheus-Scrape-Timeout-Seconds"))
    res = await prober.probe(str(address), netns, count, budget)
    fams = []

    def gauge(name: str, help: str, value: float, **lbl: str) -> None:
        f = MetricFamily(name, "gauge", help)
        f.add(labels(**lbl), value)
        fams.append(f)

    gauge("probe_success", "Whether at least one echo reply came back.", 1 if res.success else 0)
    gauge("probe_duration_seconds", "How long the probe took.", res.duration)
    gauge("probe_icmp_packets_sent", "Echo requests sent.", res.sent)
    gauge("probe_icmp_packets_received", "Echo replies received in time.", len(res.rtts))
    gauge("probe_icmp_packet_loss_ratio", "1 - received/sent.", 1 - len(res.rtts) / res.sent if res.sent else 1.0)
    rtt = MetricFamily("probe_icmp_rtt_seconds", "gauge", "Round-trip time of the replies: min, avg, max.")
    if res.rtts:
        rtt.add(labels(stat="min"), min(res.rtts))
        rtt.add(labels(stat="avg"), sum(res.rtts) / len(res.rtts))
        rtt.add(labels(stat="max"), max(res.rtts))
    fams.append(rtt)
    if res.errors:
        log.info("event=probe_errors target=%s netns=%s error=%r", address, netns or "-", res.errors[0])
    return web.Response(body=render(fams), headers={"Content-Type": CONTENT_TYPE})
