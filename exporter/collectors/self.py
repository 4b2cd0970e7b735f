"""The exporter's own metrics: kvmnet_build_info, the reload status, process_* (always on, no flag).

A private client_python registry, rendered with `generate_latest` and appended to each scrape by web.py.
"""
from __future__ import annotations

import platform
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import __version__
from ..revision import revision


class _BuildInfo:
    def collect(self):
        g = GaugeMetricFamily("kvmnet_build_info",
                              "kvmnet's version, the git commit it was built from and the Python it runs on; always 1.",
                              labels=["version", "revision", "python"])
        g.add_metric([__version__, revision(), platform.python_version()], 1)
        yield g


class _TaskRestarts:
    def collect(self):
        from .. import tasks
        c = CounterMetricFamily("kvmnet_task_restarts", "Background tasks (prober, discovery) restarted after they "
                                "crashed or ended (the exporter's log has the traceback).", labels=["task"])
        for task in ("prober", "discovery", *sorted(set(tasks.restarts) - {"prober", "discovery"})):
            c.add_metric([task], tasks.restarts.get(task, 0))
        yield c


class SelfMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_BuildInfo())
        ProcessCollector(registry=self.registry)
        self.reload_ok = Gauge("kvmnet_config_last_reload_successful",
                               "Whether the last configuration reload attempt was successful.",
                               registry=self.registry)
        self.reload_ts = Gauge("kvmnet_config_last_reload_success_timestamp_seconds",
                               "Timestamp of the last successful configuration reload.", registry=self.registry)
        self.render_errors = Counter("kvmnet_scrape_render_errors", "Metric families dropped from a scrape because "
                                     "they could not be rendered (see the exporter's log).", ["family"],
                                     registry=self.registry)
        self.registry.register(_TaskRestarts())
        self.reload_succeeded()

    def reload_succeeded(self) -> None:
        self.reload_ok.set(1)
        self.reload_ts.set(time.time())

    def reload_failed(self) -> None:
        self.reload_ok.set(0)

    def add(self, collector) -> None:
        """Register another collector of the exporter's own (the HTTP limits, the prober's heartbeat)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
