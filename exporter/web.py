"""The HTTP side: /metrics, /, /healthz (503 while the prober is stalled), POST /-/reload (only with
--web.enable-lifecycle; SIGHUP always), and the prober's /probe.

One scrape is in flight at a time: requests that arrive while it runs wait for it and get its result, so a flood
of scrapes costs one scrape's work. The body is Prometheus text 0.0.4 (what Prometheus accepts whatever else it
asks for), gzip-compressed when the client allows it. The exporter's own metrics (build info, reload status,
process metrics) are collectors/self.py's, appended.
"""
from __future__ import annotations

import asyncio
import gzip
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import __version__, logs, scrape
from .collectors.self import SelfMetrics
from .exposition import CONTENT_TYPE, label_value, render

log = logging.getLogger("kvmnet.web")

SERVICE_KEY = web.AppKey("service", Any)
STATE_KEY = web.AppKey("state", Any)

LANDING = """<!DOCTYPE html>
<html><head><title>kvmnet exporter</title></head>
<body><h1>kvmnet exporter</h1>
<p>Prometheus metrics for Linux bridges, taps and the KVM/QEMU guests behind them.</p>
<ul><li><a href="metrics">metrics</a></li><li><a href="healthz">healthz</a></li>{probe}</ul>
<p>version {version}</p></body></html>
"""


class _Result:
    """One scrape's body, and its gzip form computed at most once, on demand."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._gz: asyncio.Future | None = None

    async def gzipped(self) -> bytes:
        if self._gz is None:
            self._gz = asyncio.ensure_future(asyncio.to_thread(gzip.compress, self.body, 1))
        return await asyncio.shield(self._gz)


class State:
    """The web app's state: the service (swapped on reload), the self-metrics registry, the scrape in flight."""

    def __init__(self, service, reload: Callable[[], Any] | None = None) -> None:
        self.service = service
        self.reloader = reload  # () -> Loaded (blocking; raises ConfigError) or None when there is nothing to reload
        self.own = SelfMetrics()
        self.registry = self.own.registry
        self._inflight: asyncio.Future | None = None
        self._dropped: dict[str, str] = {}  # family -> why it was last dropped (log once, count always)
        self._reload_lock = asyncio.Lock()

    def render_error(self, family: str, reason: str) -> None:
        """Count every drop; log it at error the first time (and when the reason changes), then at debug."""
        self.own.render_errors.labels(family=label_value(family)).inc()
        again = self._dropped.get(family) == reason
        self._dropped[family] = reason
        logs.event(log, "family_dropped", logging.DEBUG if again else logging.ERROR, family=family, error=reason)

    def _own(self) -> bytes:
        try:
            return self.own.render()
        except Exception as exc:  # noqa: BLE001 - the exporter's own metrics must not sink the scrape either
            self.render_error("kvmnet_self", f"{type(exc).__name__}: {exc}")
            return b""

    async def _scrape(self) -> _Result:
        fams = await scrape.scrape(self.service.collectors)
        return _Result(await asyncio.to_thread(lambda: render(fams, self.render_error) + self._own()))

    async def metrics(self) -> _Result:
        """The current scrape's result; starts one if none is running."""
        fut = self._inflight
        if fut is None:
            fut = self._inflight = asyncio.ensure_future(self._scrape())

            def _done(f: asyncio.Future) -> None:
                if self._inflight is f:
                    self._inflight = None
            fut.add_done_callback(_done)
        return await asyncio.shield(fut)

    async def reload(self) -> tuple[bool, str]:
        """Re-read config and lab; on error keep serving the old ones. Returns (ok, one-line message)."""
        async with self._reload_lock:
            if self.reloader is None:
                return True, "nothing to reload"
            try:
                loaded = await asyncio.to_thread(self.reloader)
                self.service.apply(loaded)
            except Exception as exc:  # noqa: BLE001 - ConfigError is the expected case; anything else keeps serving too
                self.own.reload_failed()
                logs.event(log, "reload_failed", logging.ERROR, error=str(exc))
                return False, str(exc)
            self.own.reload_succeeded()
            logs.event(log, "reloaded", netns=",".join(n for n in loaded.watched if n) or "-",
                       targets=len(loaded.targets))
            return True, "reloaded"


def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (`gzip`, `gzip;q=0.5`, `*`), honouring q=0."""
    allowed = None
    for part in header.split(","):
        token, _, params = part.strip().partition(";")
        token = token.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if token == "gzip":
            return q > 0
        if token == "*":
            allowed = q > 0
    return bool(allowed)


async def handle_metrics(request: web.Request) -> web.Response:
    try:
        result = await request.app[STATE_KEY].metrics()
    except Exception as exc:  # noqa: BLE001 - collectors' own failures never get here; this is a bug, say it once
        logs.event(log, "scrape_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
        log.debug("scrape traceback", exc_info=True)
        return web.Response(status=500, text=f"scrape failed: {exc}\n")
    headers = {"Content-Type": CONTENT_TYPE, "Vary": "Accept-Encoding"}
    body = result.body
    if accepts_gzip(request.headers.get("Accept-Encoding", "")):
        body = await result.gzipped()
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


async def handle_landing(request: web.Request) -> web.Response:
    probe = '<li><a href="probe">probe</a></li>' if request.app.get(PROBE_KEY) else ""
    return web.Response(text=LANDING.format(version=__version__, probe=probe), content_type="text/html")


async def handle_health(request: web.Request) -> web.Response:
    """503 with the reason while a background task the exporter needs is not running (the prober stalled or
    crashed and is waiting for its restart): a liveness probe can then restart the process."""
    prober = getattr(request.app[STATE_KEY].service, "prober", None)
    health = getattr(prober, "health", None)
    if health is not None:
        ok, why = health()
        if not ok:
            return web.Response(status=503, text=why + "\n")
    return web.Response(text="ok\n")


async def handle_reload(request: web.Request) -> web.Response:
    if not request.app[LIFECYCLE_KEY]:
        # As Prometheus without --web.enable-lifecycle: 403 and this text. SIGHUP still reloads.
        return web.Response(status=403, text="Lifecycle API is not enabled.\n")
    ok, msg = await request.app[STATE_KEY].reload()
    return web.Response(status=200 if ok else 500, text=msg + "\n")


PROBE_KEY = web.AppKey("probe_handler", Any)
LIFECYCLE_KEY = web.AppKey("lifecycle", bool)


def create_app(service, reload: Callable[[], Any] | None = None, *, probe_handler=None,
               middlewares: tuple = (), sighup: bool = False, lifecycle: bool = False) -> web.Application:
    """The aiohttp app. `reload` re-reads the files (blocking, raises on bad input); `probe_handler` serves /probe."""
    app = web.Application(middlewares=list(middlewares), client_max_size=64 * 1024)
    state = State(service, reload)
    app[STATE_KEY] = state
    app[SERVICE_KEY] = service
    app[PROBE_KEY] = probe_handler
    app[LIFECYCLE_KEY] = lifecycle  # --web.enable-lifecycle: POST /-/reload
    app.router.add_get("/", handle_landing)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_health)
    app.router.add_post("/-/reload", handle_reload)
    if probe_handler is not None:
        app.router.add_get("/probe", probe_handler)

    async def startup(app: web.Application) -> None:
        await service.start()
        if sighup:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(state.reload()))

    async def cleanup(app: web.Application) -> None:
        if sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await service.stop()

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app
