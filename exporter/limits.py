"""Serving the aiohttp app with limits that `web.run_app` does not offer: a connection cap and a deadline for
clients that connect and then say nothing (or dribble a header a byte at a time).

What bounds what:
- request line and each header: `max_line_size` / `max_field_size` (aiohttp's parser answers 400/431 beyond them);
  at most `max_headers` headers; a declared body over `max_body` is refused with 413 before any handler runs (an
  unread body is otherwise drained by aiohttp for at most its lingering time).
- a new connection must deliver a whole first request within `header_timeout` (and finish its TLS handshake in that
  time too); after each response the connection may idle for `keepalive_timeout`, then it is closed.
- at most `max_connections` at once. When full, a new connection evicts the oldest one that is idle (no request in
  progress), so a pile of idle sockets cannot lock Prometheus out; only when every connection is busy is the new one
  refused with a 503.

    serve(app, host, port, ssl_context, Limits())   # blocks until SIGTERM/SIGINT, then shuts down cleanly
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from dataclasses import dataclass

from aiohttp import web, web_protocol

from . import logs

log = logging.getLogger("kvmnet.web")


@dataclass
class Limits:
    max_connections: int = 256
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64
    max_body: int = 64 * 1024
    shutdown_timeout: float = 5.0


_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 20\r\nConnection: close\r\n\r\ntoo many connections"


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(_BUSY)
        transport.close()


class _Conn(asyncio.Protocol):
    """Wraps aiohttp's per-connection RequestHandler: passes everything through, keeps a deadline."""

    def __init__(self, tracker: _Tracker, inner: asyncio.Protocol) -> None:
        self.tracker, self.inner = tracker, inner
        self.transport = None
        self.busy = 0
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.busy == 0 and self.transport is not None:
            self.tracker.timeouts += 1
            self.transport.abort()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.tracker.conns[transport] = self
        self.arm(self.tracker.limits.header_timeout)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc) -> None:
        self.disarm()
        if self.transport is not None:
            self.tracker.conns.pop(self.transport, None)
        self.inner.connection_lost(exc)


class _Counting(web_protocol.RequestHandler):
    """aiohttp's per-connection handler, counting requests its parser refuses (400/431) for kvmnet_http_*."""

    __slots__ = ("tracker",)

    def handle_error(self, request, status=500, exc=None, message=None):
        if 400 <= status < 500:  # BadHttpMessage, LineTooLong, too many headers: no handler ran
            self.tracker.malformed += 1
        return super().handle_error(request, status, exc, message)


class _Tracker:
    def __init__(self, server, limits: Limits) -> None:
        self.server, self.limits = server, limits
        self.conns: dict[object, _Conn] = {}  # transport -> connection, oldest first
        self.evicted = self.refused = self.timeouts = self.too_large = self.malformed = 0

    def collect(self):
        """kvmnet_http_* for collectors/self.py (client_python collector interface)."""
        from prometheus_client.core import CounterMetricFamily
        for name, value, help in (
                ("connections_refused", self.refused, "Connections refused with 503: every connection was busy."),
                ("connections_evicted", self.evicted, "Idle connections closed to make room for a new one."),
                ("connections_timed_out", self.timeouts, "Connections closed for sending no whole request in time "
                                                         "(header timeout) or idling past the keep-alive timeout."),
                ("requests_too_large", self.too_large, "Requests refused with 413: body over the limit."),
                ("requests_malformed", self.malformed, "Requests the HTTP parser refused before any handler (400/431: "
                                                       "a request line or header over the limit, too many headers, "
                                                       "garbage).")):
            yield CounterMetricFamily(f"kvmnet_http_{name}", help, value=value)
        from prometheus_client.core import GaugeMetricFamily
        yield GaugeMetricFamily("kvmnet_http_connections", "Open HTTP connections.", value=len(self.conns))

    def factory(self) -> asyncio.Protocol:
        if len(self.conns) >= self.limits.max_connections:
            idle = next((c for c in self.conns.values() if c.busy == 0), None)
            if idle is None:
                self.refused += 1
                return _Refuse()
            self.evicted += 1
            self.conns.pop(idle.transport, None)
            idle.transport.abort()
        try:  # what web.Server.__call__ does, with the subclass that counts parser refusals
            handler = _Counting(self.server, loop=self.server._loop, **self.server._kwargs)
            handler.tracker = self
        except (AttributeError, TypeError):  # an aiohttp whose Server differs: serve, uncounted
            handler = self.server()
        return _Conn(self, handler)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if request.content_length is not None and request.content_length > self.limits.max_body:
            self.too_large += 1
            raise web.HTTPRequestEntityTooLarge(max_size=self.limits.max_body, actual_size=request.content_length)
        conn = self.conns.get(request.transport)
        if conn is None:
            return await handler(request)
        conn.busy += 1
        conn.disarm()
        try:
            return await handler(request)
        finally:
            conn.busy -= 1
            if conn.busy == 0 and conn.transport is not None and not conn.transport.is_closing():
                conn.arm(self.limits.keepalive_timeout)


async def serve_async(app: web.Application, host: str | None, port: int, ssl_context=None,
                      limits: Limits | None = None, ready=None, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT, or until `stop` is set when one is given (then no signal handlers are
    installed: tests stop it so, without signalling their own process). `ready(tracker)` is called once
    listening."""
    limits = limits or Limits()
    tracker = _Tracker(None, limits)
    app.middlewares.insert(0, tracker.middleware)
    from .web import STATE_KEY  # web.py does not import this module
    state = app.get(STATE_KEY)
    if state is not None:
        state.own.add(tracker)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=limits.keepalive_timeout, max_line_size=limits.max_line_size,
                           max_field_size=limits.max_field_size, max_headers=limits.max_headers,
                           shutdown_timeout=limits.shutdown_timeout)
    await runner.setup()
    tracker.server = runner.server
    loop = asyncio.get_running_loop()
    own_signals = stop is None  # a caller's stop event: no signal handlers (tests do not signal pytest)
    stop = stop or asyncio.Event()
    # Plain signal handlers, not loop.add_signal_handler: those only run when the event loop gets to them, so a
    # loop starved by a bug would ignore SIGTERM. This one runs in the main thread whatever the loop does, asks the
    # loop to stop, and if it has not stopped within the shutdown timeout + 5 s (or on a second signal) exits hard.
    watchdog: list[threading.Timer] = []

    def force_exit() -> None:
        logs.event(log, "forced_exit", logging.ERROR, reason="shutdown did not finish in time")
        os._exit(1)

    def on_signal(signum, _frame) -> None:
        if watchdog:
            force_exit()
        t = threading.Timer(limits.shutdown_timeout + 5.0, force_exit)
        t.daemon = True
        t.start()
        watchdog.append(t)
        loop.call_soon_threadsafe(stop.set)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if own_signals else {}
    try:
        server = await loop.create_server(tracker.factory, host, port, ssl=ssl_context, backlog=512,
                                          reuse_address=True,
                                          ssl_handshake_timeout=limits.header_timeout if ssl_context else None)
        try:
            logs.event(log, "listening", address=f"{host or ''}:{port}", tls=ssl_context is not None,
                       max_connections=limits.max_connections, header_timeout=limits.header_timeout)
            if ready is not None:
                ready(tracker)
            await stop.wait()
        finally:
            server.close()
            for conn in list(tracker.conns.values()):
                if conn.busy == 0 and conn.transport is not None:
                    conn.transport.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        await runner.cleanup()
        for t in watchdog:
            t.cancel()


def serve(app: web.Application, host: str | None, port: int, ssl_context=None, limits: Limits | None = None) -> None:
    asyncio.run(serve_async(app, host, port, ssl_context, limits))
