"""/probe?target=ADDR[&netns=NS][&count=N]: blackbox-style on-demand probes on the prober's shared sockets, with
their own small exposition (probe_success, probe_icmp_*).

Bounds (README "Failure behaviour"): every bad value is a 400 naming it, nothing is probed.
- target: a unicast IP address (not multicast, broadcast or unspecified) without a zone (`%eth0`).
- netns: a watched namespace or one a configured target is probed from; absent or empty means the default (the one
  watched named namespace, else the exporter's own), never "the exporter's own" by itself.
- count: 1 to PROBE_COUNT_MAX.
- X-Prometheus-Scrape-Timeout-Seconds: a finite number of seconds > 0 (at most 32 characters); the probe's budget
  is it minus 0.5 s, between 0.1 s and 60 s. Absent: 3 s.
- At most PROBE_INFLIGHT_MAX probes at once; beyond that 429 at once, so slow probes cannot hold every connection
  and /metrics stays served. Refusals are counted in kvmnet_http_probe_rejected_total{reason}.
"""
from __future__ import annotations

import ipaddress
import logging
import math
from typing import Any

from kvmnet.common.logfmt import fmt

from ..config import is_unicast
from ..exposition import CONTENT_TYPE, MetricFamily, labels, render
from .engine import PROBE_BUDGET_MAX, GuestProber, Prober

log = logging.getLogger("kvmnet.guests")

PROBE_COUNT_MAX = 100
PROBE_INFLIGHT_MAX = 8
TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"


def _budget(header: str | None, default: float = 3.0) -> float:
    """Seconds this probe may take: Prometheus' scrape timeout minus a margin for the response (blackbox: 0.5 s).
    Raises ValueError for a value that is not a finite number of seconds above 0."""
    if header is None:
        return default
    try:
        if len(header) > 32:
            raise ValueError
        t = float(header)
    except ValueError:
        t = math.nan
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{TIMEOUT_HEADER}: not a finite number of seconds above 0: {header[:32]!r}")
    return max(min(t - 0.5, PROBE_BUDGET_MAX), 0.1)


async def probe_handler(request: Any, prober: Prober | None = None, watched: list[str] | None = None,
                        owner: GuestProber | None = None) -> Any:
    """Blackbox-style on-demand probe on the prober's shared sockets; its own small exposition. `owner` (the
    GuestProber) holds the in-flight count and the rejection counters."""
    from aiohttp import web

    def reject(reason: str, exc: type, text: str, **kw: Any) -> Any:
        if owner is not None:
            owner.rejected[reason] = owner.rejected.get(reason, 0) + 1
        return exc(text=text + "\n", **kw)

    if prober is None:
        owner = request.app.get("kvmnet_prober") if hasattr(request.app, "get") else None
        prober = owner.prober if isinstance(owner, GuestProber) else owner
        if prober is None:
            raise web.HTTPServiceUnavailable(text="prober not running\n")
    q = request.query
    target = q.get("target", "")
    try:
        address = ipaddress.ip_address(target)
        if not is_unicast(address):
            raise ValueError
    except ValueError:
        raise reject("bad_request", web.HTTPBadRequest,
                     f"target: not a unicast IP address without a zone: {target[:64]!r}") from None
    named = [n for n in (watched or []) if n]
    default = named[0] if len(named) == 1 else ""
    netns = q.get("netns", "") or default
    allowed = set(watched or [""]) | set(getattr(owner, "target_namespaces", ()) or ())
    if netns not in allowed:
        raise reject("netns_not_watched", web.HTTPForbidden, f"netns: not a watched namespace: {netns[:64]!r}")
    count_text = q.get("count", "3")
    if not (count_text.isascii() and count_text.isdigit() and 1 <= int(count_text) <= PROBE_COUNT_MAX):
        raise reject("bad_request", web.HTTPBadRequest,
                     f"count: not a number from 1 to {PROBE_COUNT_MAX}: {count_text[:16]!r}")
    count = int(count_text)
    try:
        budget = _budget(request.headers.get(TIMEOUT_HEADER))
    except ValueError as exc:
        raise reject("bad_request", web.HTTPBadRequest, str(exc)) from None
    if owner is not None:
        if owner.inflight >= PROBE_INFLIGHT_MAX:
            raise reject("too_many", web.HTTPTooManyRequests,
                         f"too many probes in flight (at most {PROBE_INFLIGHT_MAX})", headers={"Retry-After": "1"})
        owner.inflight += 1
    try:
        res = await prober.probe(str(address), netns, count, budget)
    finally:
        if owner is not None:
            owner.inflight -= 1
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
        log.info("%s", fmt("probe_errors", target=address, netns=netns or "-", error=res.errors[0]))
    return web.Response(body=render(fams), headers={"Content-Type": CONTENT_TYPE})
