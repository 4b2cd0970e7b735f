"""The one namespace watcher: which named namespaces exist, and under which identity (nsfs inode).

A socket keeps the namespace it was made in alive, devices and all, so whoever holds sockets in a watched namespace
must drop them when the namespace is deleted, and reopen them when a new one appears under the same name. The
Service owns one watcher; the netlink sources, the collectors' guard and the prober ask it (`identity()`), and it
tells its subscribers when a namespace they may hold sockets in is gone or was replaced.

    w = NamespaceWatcher(names=lambda: ["lab-host"])
    w.subscribe(lambda name, ino: ...)   # ino: the new identity, None when gone; called on every change
    w.identity("lab-host")               # the current inode (raises NetnsGone); a change seen here notifies too
    await w.run()                         # checks every name once per `interval` (a plain coroutine: supervise it)

Changes are seen by polling (`stat` of /run/netns/NAME, a microsecond each) once per interval and on every
`identity()` call, so a scrape always acts on the current namespace. The first sight of a name is no change.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable

from kvmnet.common import netns as nsmod

log = logging.getLogger("kvmnet.netns")

Listener = Callable[[str, "int | None"], None]


class NamespaceWatcher:
    def __init__(self, names: Callable[[], Iterable[str]] = lambda: (), interval: float = 1.0,
                 inode: Callable[[str], int] | None = None) -> None:
        self.names = names  # the named namespaces to check in run(); "" (our own) is never checked
        self.interval = interval
        self._inode = inode or (lambda name: nsmod.inode(name))  # looked up at call time (tests patch it)
        self._seen: dict[str, int | None] = {}  # name -> last identity seen, None = did not exist
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()  # identity() is called from scrape threads too

    def subscribe(self, listener: Listener) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def identity(self, name: str) -> int:
        """The inode of namespace `name` now. Raises NetnsGone. Subscribers hear of a change first."""
        if not name:
            return self._inode(name)
        try:
            ino: int | None = self._inode(name)
        except nsmod.NetnsGone:
            ino = None
        self._note(name, ino)
        if ino is None:
            raise nsmod.NetnsGone(f"network namespace {name!r} does not exist")
        return ino

    def check(self, names: Iterable[str] | None = None) -> None:
        """Look at every name (default: `names()`) once; notify changes."""
        for name in list(self.names() if names is None else names):
            if name:
                try:
                    self.identity(name)
                except nsmod.NetnsGone:
                    pass

    def forget(self, keep: Iterable[str]) -> None:
        """Drop what is remembered of names no longer watched (after a reload)."""
        keep = set(keep)
        with self._lock:
            for name in [n for n in self._seen if n not in keep]:
                del self._seen[name]

    def _note(self, name: str, ino: int | None) -> None:
        with self._lock:
            first = name not in self._seen
            old = self._seen.get(name)
            self._seen[name] = ino
        if first or old == ino:
            return
        for listener in list(self._listeners):
            try:
                listener(name, ino)
            except Exception:  # noqa: BLE001 - one subscriber's failure must not keep the news from the others
                log.exception("event=netns_listener_failed netns=%s", name)

    async def run(self) -> None:
        """Check every watched name once per interval, forever (cancel to stop)."""
        while True:
            self.check()
            await asyncio.sleep(self.interval)
