"""One scrape: run every collector, time each one, and never let one failure sink the rest.

A collector is any object with `name`, `netns` and a blocking `collect()` that returns metric families. Blocking
is the honest shape here: netlink dumps and /proc reads are syscalls. Collectors run in worker threads so the
event loop (and the ICMP prober on it) keeps running during a scrape.

    # HELP kvmnet_scrape_collector_success Whether a collector succeeded in this scrape.
    # TYPE kvmnet_scrape_collector_success gauge
    kvmnet_scrape_collector_success{collector="bridge",netns="seed-host"} 1
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from .exposition import MetricFamily, labels

log = logging.getLogger("kvmnet.scrape")


class Collector(Protocol):
    name: str   # the `collector` label
    netns: str  # the watched namespace's name, "" for the exporter's own (or for collectors not tied to one)

    def collect(self) -> Iterable[MetricFamily]: ...


class ExpectedAbsence(Exception):
    """Raised by a collector when there is nothing to report and that is normal; logged at debug, success 1."""


# (collector, netns) -> the error it is failing with. A collector that keeps failing the same way (a deleted
# namespace) is logged at error once, then at debug, and once more when it recovers: not a line every scrape.
_failing: dict[tuple[str, str], str] = {}
_failing_lock = threading.Lock()


def _run_one(collector: Collector) -> tuple[list[MetricFamily], float, bool]:
    start = time.perf_counter()
    key = (collector.name, collector.netns)
    try:
        fams = list(collector.collect())
        ok = True
    except ExpectedAbsence as exc:
        log.debug("event=collector_no_data collector=%s netns=%s reason=%r", collector.name, collector.netns, str(exc))
        fams, ok = [], True
    except Exception as exc:  # noqa: BLE001 - a collector failure is reported, never raised into the scrape
        with _failing_lock:
            again = _failing.get(key) == str(exc)
            _failing[key] = str(exc)
        log.log(logging.DEBUG if again else logging.ERROR, "event=collector_failed collector=%s netns=%s error=%r",
                collector.name, collector.netns, str(exc))
        log.debug("collector traceback", exc_info=True)
        fams, ok = [], False
    if ok and key in _failing:
        with _failing_lock:
            was = _failing.pop(key, None)
        if was is not None:
            log.info("event=collector_recovered collector=%s netns=%s", collector.name, collector.netns)
    return fams, time.perf_counter() - start, ok


async def scrape(collectors: Sequence[Collector]) -> list[MetricFamily]:
    """Run all collectors concurrently in threads; append the per-collector duration and success families."""
    results = await asyncio.gather(*(asyncio.to_thread(_run_one, c) for c in collectors))
    duration = MetricFamily("kvmnet_scrape_collector_duration_seconds", "gauge",
                            "Time a collector took in this scrape.")
    success = MetricFamily("kvmnet_scrape_collector_success", "gauge",
                           "Whether a collector succeeded in this scrape (0: see the exporter's log).")
    out: list[MetricFamily] = []
    for c, (fams, secs, ok) in zip(collectors, results):
        out.extend(fams)
        lbl = labels(collector=c.name, netns=c.netns)
        duration.add(lbl, secs)
        success.add(lbl, 1 if ok else 0)
    out.extend((duration, success))
    return out
