"""Every background task runs under `supervise()`: a crash is one log event with the exception and its traceback
as a field, counted in `kvmnet_task_restarts_total{task}`, and the task restarted with exponential backoff (0.1 s
doubling to 30 s; back to 0.1 s once it has run for a minute). A task that returns is restarted the same way: the
loops here are meant to run until cancelled.

    self._task = tasks.start("prober", self._run)   # a coroutine function, called again on each restart

Restart counts are per process (a plain dict read by collectors/self.py), like process_* metrics.
"""
from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable

from . import logs

log = logging.getLogger("kvmnet.tasks")

BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0
HEALTHY_AFTER = 60.0  # seconds a task must run before its backoff is reset

restarts: dict[str, int] = {}  # task -> restarts since start


async def supervise(name: str, run: Callable[[], Awaitable[None]], backoff_min: float = BACKOFF_MIN,
                    backoff_max: float = BACKOFF_MAX) -> None:
    loop = asyncio.get_running_loop()
    delay = backoff_min
    while True:
        started = loop.time()
        try:
            await run()
            error, tb = "task returned", ""
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point: nothing ends a background task silently
            error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
        if loop.time() - started >= HEALTHY_AFTER:
            delay = backoff_min
        restarts[name] = restarts.get(name, 0) + 1
        logs.event(log, "task_crashed", logging.ERROR, task=name, error=error, restart_in=f"{delay:g}s",
                   restarts=restarts[name], traceback=tb)
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_max)


def start(name: str, run: Callable[[], Awaitable[None]], **kw: float) -> asyncio.Task[None]:
    """Run `run()` supervised in a task named `kvmnet-NAME`."""
    return asyncio.create_task(supervise(name, run, **kw), name=f"kvmnet-{name}")


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a task and wait until it has ended (None: nothing to do)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
