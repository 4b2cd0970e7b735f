"""/probe?target=ADDR[&netns=NS][&count=N]: blackbox-style on-demand probes on the prober's shared sockets, with
their own small exposition (probe_success, probe_icmp_*)."""
from __future__ import annotations

import ipaddress
import logging
from typing import Any

from ..exposition import CONTENT_TYPE, MetricFamily, labels, render
from .engine import GuestProber, Prober

log = logging.getLogger("kvmnet.guests")

PROBE_COUNT_MAX = 100


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
