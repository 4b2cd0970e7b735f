"""The operator's page at `/`: what the exporter sees right now, as server-rendered HTML tables.

Bridges (carrier, ports), their ports (kind, guest, carrier, STP state, receive/transmit rates, drops) and the guests
(up, run state, RTT, loss, last reply). No JavaScript and no external assets: one HTML document with inline CSS,
refreshing itself with a meta refresh. It sits behind the same middlewares as /metrics (TLS, basic auth).

The data is the exporter's own /metrics body, parsed back: the page shows exactly what Prometheus gets, and it
depends on metric names (the interface contract) rather than on the collectors' internals.

Rates are differences between two samples of the counters divided by the time between them: this page load's and
the previous one's (kept in memory, shared by all viewers, used when 1 s to 10 min old). When there is no usable
previous sample, the page samples twice, 1 s apart. Loss and RTT are the same differences of the prober's counters
(replies/requests, RTT sum/count): over the interval since the previous load, not since the exporter started.

Every name and label value is HTML-escaped; bytes that are not UTF-8 (device names are bytes to the kernel) are
shown as \\xNN escapes.
"""
from __future__ import annotations

import asyncio
import html
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

MIN_INTERVAL = 1.0     # seconds: a shorter interval between samples gives rates too noisy to show
MAX_AGE = 600.0        # seconds: an older previous sample is not "now" any more
REFRESH = 10           # seconds: the meta refresh

Labels = tuple[tuple[str, str], ...]


def _key(labels: dict[str, str], *names: str) -> tuple[str, ...]:
    return tuple(labels.get(n, "") for n in names)


@dataclass
class Sample:
    """One parse of the exposition: samples by metric name -> list of (labels, value); taken at `t` (monotonic)."""
    t: float
    series: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        return {_key(l, *keys): v for l, v in self.series.get(name, [])}

    def labels(self, name: str) -> list[dict[str, str]]:
        return [l for l, v in self.series.get(name, [])]


def parse(body: bytes, t: float) -> Sample:
    s = Sample(t)
    for fam in text_string_to_metric_families(body.decode("utf-8", "surrogateescape")):
        for smp in fam.samples:
            s.series.setdefault(smp.name, []).append((dict(smp.labels), smp.value))
    return s


class Page:
    """Keeps the previous sample; `render_for(get_body)` produces the page."""

    def __init__(self, version: str = "") -> None:
        self.version = version
        self.previous: Sample | None = None
        self.before: Sample | None = None
        self._lock = asyncio.Lock()

    async def sample_pair(self, get_body: Callable[[], Awaitable[bytes]]) -> tuple[Sample | None, Sample]:
        """(previous, current) samples for one page load."""
        async with self._lock:
            now = parse(await get_body(), time.monotonic())
            prev = self.previous
            if prev is None or now.t - prev.t > MAX_AGE:
                await asyncio.sleep(MIN_INTERVAL)
                prev, now = now, parse(await get_body(), time.monotonic())
            elif now.t - prev.t < MIN_INTERVAL:
                # Reloaded within a second: rates against the sample before the previous one, kept for this.
                return self.before, now
            self.before, self.previous = prev, now
            return prev, now

    async def handle(self, request: web.Request, get_body: Callable[[], Awaitable[bytes]],
                     probe: bool = False) -> web.Response:
        prev, cur = await self.sample_pair(get_body)
        text = await asyncio.to_thread(render, prev, cur, self.version, probe)
        return web.Response(body=text.encode("utf-8", "backslashreplace"), content_type="text/html",
                            charset="utf-8", headers={"Cache-Control": "no-store"})


def _rate(cur: dict, prev: dict | None, key: tuple, dt: float) -> float | None:
    if prev is None or key not in cur or key not in prev or dt <= 0:
        return None
    d = cur[key] - prev[key]
    return d / dt if d >= 0 else None   # a counter reset (device re-created): no rate this time


def show(value: str) -> str:
    """A label value for HTML: non-UTF-8 bytes (surrogate-escaped) as \\xNN, then escaped."""
    return html.escape(value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), quote=True)


def _si(v: float | None, unit: str) -> str:
    if v is None or math.isnan(v):
        return "&mdash;"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.1f} {prefix}{unit}"
    return f"{v:.0f} {unit}" if v >= 10 or v == 0 else f"{v:.1f} {unit}"


def _bits(bytes_per_second: float | None) -> str:
    return _si(None if bytes_per_second is None else 8 * bytes_per_second, "bit/s")


def _seconds(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "&mdash;"
    if v < 1e-3:
        return f"{v * 1e6:.0f} &micro;s"
    if v < 1:
        return f"{v * 1e3:.2f} ms"
    return f"{v:.2f} s"


def _updown(v: float | None, up: str = "up", down: str = "down") -> str:
    if v is None:
        return '<td class="unk">unknown</td>'
    return f'<td class="ok">{up}</td>' if v == 1 else f'<td class="bad">{down}</td>'


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#111;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin-bottom:.5em}
th,td{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.ok{color:#0a6b0a;font-weight:600} td.bad{color:#fff;background:#c62828;font-weight:600} td.unk{color:#777}
tr.down td:first-child{border-left:4px solid #c62828}
.meta{color:#555} code{font-family:ui-monospace,monospace}
"""


def render(prev: Sample | None, cur: Sample, version: str = "", probe: bool = False) -> str:
    dt = cur.t - prev.t if prev is not None else 0.0
    out = [f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kvmnet exporter</title><style>{CSS}</style></head><body>
<h1>kvmnet exporter</h1>
<p class="meta">What this exporter sees now; rates over the last {dt:.1f} s (between this page load and the previous
one). Refreshes every {REFRESH} s. <a href="metrics">metrics</a> &middot; <a href="healthz">healthz</a>
{'&middot; <a href="probe">probe</a>' if probe else ''} &middot; version {show(version)}</p>"""]

    # Bridges ---------------------------------------------------------------------------------------------
    bkeys = ("netns", "bridge")
    bup = cur.by("kvmnet_bridge_up", *bkeys)
    bports = cur.by("kvmnet_bridge_ports", *bkeys)
    out.append('<h2 id="bridges">Bridges</h2><table><tr><th>namespace</th><th>bridge</th><th>carrier</th>'
               '<th>ports</th><th>receive</th><th>transmit</th></tr>')
    brx, btx = cur.by("kvmnet_bridge_receive_bytes_total", *bkeys), cur.by("kvmnet_bridge_transmit_bytes_total", *bkeys)
    pbrx = prev.by("kvmnet_bridge_receive_bytes_total", *bkeys) if prev else None
    pbtx = prev.by("kvmnet_bridge_transmit_bytes_total", *bkeys) if prev else None
    for k in sorted(bup):
        rx, tx = _rate(brx, pbrx, k, dt), _rate(btx, pbtx, k, dt)
        out.append(f'<tr{" class=down" if bup[k] != 1 else ""}><td>{show(k[0])}</td><td>{show(k[1])}</td>'
                   f'{_updown(bup[k])}<td class="num">{bports.get(k, 0):.0f}</td>'
                   f'<td class="num">{_bits(rx)}</td><td class="num">{_bits(tx)}</td></tr>')
    if not bup:
        out.append('<tr><td colspan="6">no bridges seen</td></tr>')
    out.append("</table>")

    # Ports -----------------------------------------------------------------------------------------------
    pkeys = ("netns", "bridge", "device")
    info = {_key(l, *pkeys): l for l in cur.labels("kvmnet_port_info")}
    pup = cur.by("kvmnet_port_up", *pkeys)
    stp = {_key(l, *pkeys): l.get("state", "") for l, v in cur.series.get("kvmnet_port_stp_state", []) if v == 1}
    counters = {n: (cur.by(f"kvmnet_port_{n}_total", *pkeys),
                    prev.by(f"kvmnet_port_{n}_total", *pkeys) if prev else None)
                for n in ("receive_bytes", "transmit_bytes", "receive_dropped", "transmit_dropped")}
    out.append('<h2 id="ports">Ports</h2><table><tr><th>namespace</th><th>bridge</th><th>device</th><th>kind</th>'
               '<th>guest</th><th>carrier</th><th>STP</th><th>receive</th><th>transmit</th><th>drops</th></tr>')
    for k in sorted(set(info) | set(pup)):
        i = info.get(k, {})
        r = {n: _rate(c, p, k, dt) for n, (c, p) in counters.items()}
        drops = None if r["receive_dropped"] is None or r["transmit_dropped"] is None \
            else r["receive_dropped"] + r["transmit_dropped"]
        out.append(f'<tr{" class=down" if pup.get(k) != 1 else ""}><td>{show(k[0])}</td><td>{show(k[1])}</td>'
                   f'<td><code>{show(k[2])}</code></td><td>{show(i.get("kind", ""))}</td>'
                   f'<td>{show(i.get("guest", "")) or "&mdash;"}</td>{_updown(pup.get(k))}'
                   f'<td>{show(stp.get(k, "")) or "&mdash;"}</td>'
                   f'<td class="num">{_bits(r["receive_bytes"])}</td><td class="num">{_bits(r["transmit_bytes"])}</td>'
                   f'<td class="num">{_si(drops, "/s")}</td></tr>')
    if not pup:
        out.append('<tr><td colspan="10">no bridge ports seen</td></tr>')
    out.append("</table>")

    # Guests ----------------------------------------------------------------------------------------------
    gkeys = ("netns", "guest")
    gup = cur.by("kvmnet_guest_up", *gkeys)
    ginfo = {_key(l, *gkeys): l for l in cur.labels("kvmnet_guest_info")}
    gstate = {_key(l, *gkeys): l.get("state", "") for l, v in cur.series.get("kvmnet_guest_state", []) if v == 1}
    g = {n: (cur.by(n, *gkeys), prev.by(n, *gkeys) if prev else None)
         for n in ("kvmnet_guest_ping_requests_total", "kvmnet_guest_ping_replies_total",
                   "kvmnet_guest_ping_rtt_seconds_sum", "kvmnet_guest_ping_rtt_seconds_count")}
    last = cur.by("kvmnet_guest_last_reply_timestamp_seconds", *gkeys)
    wall = time.time()
    out.append('<h2 id="guests">Guests</h2><table><tr><th>namespace</th><th>guest</th><th>address</th>'
               '<th>device</th><th>ping</th><th>state</th><th>RTT (mean)</th><th>loss</th><th>last reply</th></tr>')
    for k in sorted(gup):
        gi = ginfo.get(k, {})
        req, rep, rsum, rcnt = (_rate(*g[n], k, dt) for n in g)
        loss = None if not req or rep is None else min(1.0, max(0.0, 1 - rep / req))
        rtt = rsum / rcnt if rcnt else None
        ago = f"{wall - last[k]:.0f} s ago" if last.get(k) else "never"
        out.append(f'<tr{" class=down" if gup[k] != 1 else ""}><td>{show(k[0])}</td><td>{show(k[1])}</td>'
                   f'<td>{show(gi.get("address", "")) or "&mdash;"}</td>'
                   f'<td><code>{show(gi.get("device", "")) or "&mdash;"}</code></td>{_updown(gup[k])}'
                   f'<td>{show(gstate.get(k, "")) or "&mdash;"}</td><td class="num">{_seconds(rtt)}</td>'
                   f'<td class="num">{"&mdash;" if loss is None else f"{loss * 100:.0f} %"}</td>'
                   f'<td class="num">{ago}</td></tr>')
    if not gup:
        out.append('<tr><td colspan="9">no guests probed</td></tr>')
    out.append("</table>")

    # Collectors that fail: the page must not look healthy when it is blind.
    failing = [l for l, v in cur.series.get("kvmnet_scrape_collector_success", []) if v != 1]
    if failing:
        out.append('<h2 id="collectors">Failing collectors</h2><ul>' + "".join(
            f'<li>{show(l.get("collector", ""))} for namespace &quot;{show(l.get("netns", ""))}&quot;</li>'
            for l in failing) + "</ul>")
    out.append("</body></html>\n")
    return "".join(out)
