"""What the exporter runs, built from flags + config file + lab file, and rebuilt on reload.

`load(settings)` reads the files (raising ConfigError with one line naming the field); `Service` turns that into
collectors, one set per watched namespace, and the prober's background work. A reload builds a new `Loaded`
first; only if that succeeds does the service switch to it, so a bad reload keeps the old config serving.

Collectors for a named namespace are created lazily and recreated when the namespace's identity (its nsfs
inode) changes: a namespace deleted and created again under the same name is picked up with no restart, and a
deleted one fails its collectors (`kvmnet_scrape_collector_success 0`) while the rest is served. Identity comes
from the service's one NamespaceWatcher (sources/nswatch.py), which also closes the netlink source and the
prober's sockets of a namespace that is gone or replaced, scraped or not.
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvmnet.common import lab as spec
from kvmnet.common import netns as nsmod

from . import logs, tasks
from .collectors import bridge as bridge_collector
from .collectors import fdb as fdb_collector
from .collectors import identity as identity_collector
from .config import Config, ConfigError, load_config, resolve_target_netns
from .exposition import MetricFamily
from .prober.socket import IcmpSockets
from .prober.targets import Target
from .sources.identity import GuestDirectory
from .sources.netlink import NetlinkSource
from .sources.nswatch import NamespaceWatcher

log = logging.getLogger("kvmnet.service")

# --collector.NAME flags. Each is on by default. "identity" adds guest names to the bridge collectors' info.
COLLECTORS = ("bridge", "fdb", "probe", "identity")


@dataclass
class Settings:
    """Everything the command line decides; the files it names are (re)read by `load()`."""
    config_file: str | None = None
    netns: list[str] = field(default_factory=list)
    lab_file: str | None = None
    enabled: dict[str, bool] = field(default_factory=lambda: {c: True for c in COLLECTORS})
    include: re.Pattern | None = None
    exclude: re.Pattern | None = None


@dataclass
class Loaded:
    config: Config
    lab: Any  # kvmnet.common.lab.Lab | None
    watched: list[str]  # "" (own namespace) first, then the named ones, sorted
    targets: list[Target]


def load_lab(path: str):
    """The lab file (kvmnet.common.lab); its LabError becomes a ConfigError naming the file once."""
    try:
        return spec.load_lab(path)
    except spec.LabError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None


def load(settings: Settings) -> Loaded:
    config = load_config(settings.config_file) if settings.config_file else Config()
    lab = load_lab(settings.lab_file) if settings.lab_file else None
    named = list(settings.netns) + list(config.netns)
    if lab is not None and getattr(lab, "host_netns", ""):
        named.append(lab.host_netns)
    watched = ["", *sorted(set(named))]  # sorted: stable output whatever order flags and files name them
    targets = [Target(t.name, t.address, resolve_target_netns(t, named), source="config")
               for t in config.probe.targets]
    if lab is not None:
        seen = {t.name for t in targets}
        for g in getattr(lab, "guests", []):
            if g.name in seen or getattr(g, "address", None) is None:
                continue
            targets.append(Target(g.name, g.address.ip, lab.host_netns or "", mac=g.mac or "",
                                  bridge=g.bridge or "", device=g.device or "", source="lab"))
    return Loaded(config, lab, watched, targets)


class Guarded:
    """A collector bound to one named namespace, (re)created whenever that namespace's identity changes."""

    def __init__(self, name: str, netns: str, make: Callable[[], Any],
                 identity: Callable[[str], int] = nsmod.inode) -> None:
        self.name = name
        self.netns = netns
        self._make = make
        self._identity = identity  # the service's NamespaceWatcher.identity
        self._inner = None
        self._ino = None

    def collect(self) -> Iterable[MetricFamily]:
        try:
            ino = self._identity(self.netns)
        except nsmod.NetnsGone:
            # Drop our sockets in it: they would keep a deleted namespace (and its devices) alive.
            self.close()
            raise  # this collector fails, the others go on
        if self._inner is None or ino != self._ino:
            if self._inner is not None:
                logs.event(log, "netns_recreated", collector=self.name, netns=self.netns)
            self.close()
            self._inner = self._make()
            self._ino = ino
        return self._inner.collect()

    def close(self) -> None:
        inner, self._inner = self._inner, None
        # A collector's close(), or that of the netlink source it holds (shared per namespace; it reopens itself
        # when next asked).
        closer = getattr(inner, "close", None) or getattr(getattr(inner, "source", None), "close", None)
        if closer is not None:
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - closing a dead namespace's sockets must not break a scrape
                logs.event(log, "collector_close_failed", logging.DEBUG, collector=self.name, error=exc)


class Unguarded(Guarded):
    """The exporter's own namespace: nothing to guard, but the same lazy creation."""

    def collect(self) -> Iterable[MetricFamily]:
        if self._inner is None:
            self._inner = self._make()
        return self._inner.collect()


# A collector factory: (netns, service) -> collector object, or None when it has nothing to do there.
Factory = Callable[[str, "Service"], Any]


def default_factories() -> dict[str, Factory]:
    """The per-namespace collectors: links, counters and STP ("bridge"), and FDB sizes ("fdb")."""
    def bridge(ns: str, svc: Service):
        return bridge_collector.BridgeCollector(ns, identity=svc.identity, include=svc.settings.include,
                                                exclude=svc.settings.exclude, source=svc.source(ns))

    def fdb(ns: str, svc: Service):
        return fdb_collector.FdbCollector(ns, include=svc.settings.include, exclude=svc.settings.exclude,
                                          source=svc.source(ns))

    def identity(ns: str, svc: Service):
        return identity_collector.IdentityCollector(ns, svc.identity) if svc.identity is not None else None

    return {"bridge": bridge, "fdb": fdb, "identity": identity}


class Service:
    """Collectors per watched namespace, the guest directory, and the prober; swapped whole on reload.

    The one owner of the kernel resources: the netlink source of each watched namespace (made by `source_factory`,
    shared by its bridge and fdb collectors and the prober's discovery, closed when the namespace stops being
    watched), the ICMP sockets per namespace (`icmp`, made by `icmp_factory`, lent to the prober, which opens
    them as its targets need), and the one namespace watcher (`watcher`, run by `start()`), which tells the
    sources and the prober when a namespace is gone or replaced."""

    def __init__(self, settings: Settings, loaded: Loaded, factories: dict[str, Factory] | None = None,
                 prober: Any = None, source_factory: Callable[[str], Any] | None = None,
                 watcher: NamespaceWatcher | None = None, icmp_factory: Callable[..., Any] | None = None) -> None:
        self.settings = settings
        self.factories = default_factories() if factories is None else factories
        self.prober = prober  # an object with async start(loaded), async stop(), reconfigure(loaded); optional
        self.loaded = loaded
        self.watcher = watcher or NamespaceWatcher(names=self._namespaces)
        self.watcher.subscribe(self._namespace_changed)
        self._watch_task: asyncio.Task[None] | None = None
        self.source_factory = source_factory or (lambda ns: NetlinkSource(ns, identity=self.watcher.identity))
        self._sources: dict[str, Any] = {}
        self._sources_lock = threading.Lock()  # collectors are made lazily, in scrape threads
        self.identity = self._make_identity(loaded)
        if prober is not None:
            prober.directory = self.identity  # one /proc scan for port names and discovered guests alike
            prober.source_for = self.source  # discovery reads the same sockets as the collectors
            if hasattr(prober, "use_watcher"):
                prober.use_watcher(self.watcher)  # the prober's ICMP sockets follow the same namespaces
        # ICMP sockets per (namespace, family), lent to the prober; made by `icmp_factory`, else by the factory the
        # prober was built with (IcmpSocket unless a test injected one)
        self.icmp = IcmpSockets(icmp_factory)
        if prober is not None and hasattr(prober, "use_sockets"):
            prober.use_sockets(self.icmp)
        self._pool: dict[tuple[str, str], Guarded] = {}
        self.collectors: list = []
        self._build()

    def source(self, netns: str) -> Any:
        """The netlink source of a watched namespace, made on first use."""
        with self._sources_lock:
            src = self._sources.get(netns)
            if src is None:
                src = self._sources[netns] = self.source_factory(netns)
            return src

    def _namespaces(self) -> list[str]:
        """What the watcher looks at: the watched namespaces and those the configured targets are probed from."""
        return sorted({*self.loaded.watched, *(t.netns for t in self.loaded.targets)} - {""})

    def _namespace_changed(self, netns: str, ino: int | None) -> None:
        """From the watcher: `netns` is gone (ino None) or replaced. Its netlink source lets go of its sockets
        now, scraped or not (they would keep a deleted namespace alive); it reopens them when next asked."""
        logs.event(log, "netns_changed", logging.INFO, netns=netns, now="gone" if ino is None else "replaced")
        with self._sources_lock:
            src = self._sources.get(netns)
        if src is not None:
            try:
                src.close()
            except Exception as exc:  # noqa: BLE001 - a dead namespace's sockets must not break the watcher
                logs.event(log, "source_close_failed", logging.DEBUG, error=exc)

    def _close_sources(self, keep: set[str]) -> None:
        with self._sources_lock:
            gone = [ns for ns in self._sources if ns not in keep]
            closing = [self._sources.pop(ns) for ns in gone]
        for src in closing:
            try:
                src.close()
            except Exception as exc:  # noqa: BLE001 - a dead namespace's sockets must not break a reload
                logs.event(log, "source_close_failed", logging.DEBUG, error=exc)

    def _make_identity(self, loaded: Loaded) -> GuestDirectory | None:
        return GuestDirectory(lab=loaded.lab) if self.settings.enabled.get("identity", True) else None

    def _build(self) -> None:
        pool: dict[tuple[str, str], Guarded] = {}
        for ns in self.loaded.watched:
            for name, make in self.factories.items():
                if not self.settings.enabled.get(name, True):
                    continue
                key = (name, ns)
                pool[key] = self._pool.pop(key, None) or (Guarded if ns else Unguarded)(
                    name, ns, lambda make=make, ns=ns: make(ns, self), self.watcher.identity)
        for old in self._pool.values():
            old.close()
        self._pool = pool
        self._close_sources(set(self.loaded.watched))
        self.watcher.forget(self._namespaces())
        extra = []
        if self.prober is not None and hasattr(self.prober, "collectors"):
            extra = list(self.prober.collectors())
        self.collectors = list(pool.values()) + extra

    def apply(self, loaded: Loaded) -> None:
        """Switch to a freshly loaded config; collectors for namespaces still watched are kept."""
        self.loaded = loaded
        if self.identity is not None:  # --collector.identity is a flag, so it cannot change on reload
            self.identity.set_lab(loaded.lab)
        if self.prober is not None and hasattr(self.prober, "reconfigure"):
            self.prober.reconfigure(loaded)
        self._build()

    async def start(self) -> None:
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self.watcher.run(), name="kvmnet-nswatch")
        if self.prober is not None and hasattr(self.prober, "start"):
            try:
                await self.prober.start(self.loaded)
            except Exception as exc:  # noqa: BLE001 - without its prober the exporter still serves bridges
                logs.event(log, "prober_start_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
                log.debug("prober traceback", exc_info=True)

    async def stop(self) -> None:
        task, self._watch_task = self._watch_task, None
        await tasks.cancel(task)
        if self.prober is not None and hasattr(self.prober, "stop"):
            await self.prober.stop()
        self.icmp.close_all()
        for g in self._pool.values():
            g.close()
        self._close_sources(set())
