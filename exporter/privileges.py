"""Least privilege: say what the exporter needs, and as root give up the rest before anything else starts.

What it needs, and why:
- CAP_NET_RAW: the prober's raw ICMP sockets (one per namespace and family).
- CAP_SYS_ADMIN: setns() into named namespaces, to open netlink and ICMP sockets there. Needed for the whole run,
  not only at start: a watched namespace that is deleted and created again gets new sockets, and so does a
  namespace named in a reload. That is the tradeoff; CAP_SYS_ADMIN is broad, and without it only the exporter's own
  namespace can be watched.
- CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: /proc/PID/fd and /proc/PID/fdinfo of QEMU processes (tap -> guest).
  The kernel guards them with a ptrace check, and QEMU usually runs as another user (libvirt-qemu) or as root with
  more capabilities than we keep. Without them, guests are named from the lab file and libvirt's XML only.
- CAP_NET_BIND_SERVICE only if the listen port is below 1024.
What a run does not use is not kept: with no named namespace (watched, or named by a probe target) CAP_SYS_ADMIN
goes, and a reload cannot add one (restart instead); `--no-collector.probe` drops CAP_NET_RAW,
`--no-collector.identity` the two /proc ones.
Not needed: everything else, including CAP_NET_ADMIN (the netlink event socket then gets net.core.rmem_max bytes
instead of 8 MiB: more ENOBUFS resyncs under bursts, never wrong numbers; add it, or raise rmem_max, to avoid that).

`drop(port)` runs before the event loop starts and before any thread exists, because capabilities are per thread
(a thread started earlier would keep them). It empties the bounding set of everything else (so nothing we exec
can regain it) and then sets permitted = effective = the kept set, inheritable and ambient empty.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading

from . import logs

log = logging.getLogger("kvmnet.privileges")

CAP_DAC_READ_SEARCH, CAP_SETPCAP, CAP_NET_BIND_SERVICE = 2, 8, 10
CAP_NET_RAW, CAP_SYS_PTRACE, CAP_SYS_ADMIN = 13, 19, 21
NAMES = {CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH", CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE",
         CAP_NET_RAW: "CAP_NET_RAW", CAP_SYS_PTRACE: "CAP_SYS_PTRACE", CAP_SYS_ADMIN: "CAP_SYS_ADMIN"}
WHY = {CAP_NET_RAW: "raw ICMP sockets for the prober", CAP_SYS_ADMIN: "setns into named namespaces",
       CAP_SYS_PTRACE: "read /proc/PID/fd of QEMU (tap->guest)", CAP_DAC_READ_SEARCH: "list /proc/PID/fd of QEMU",
       CAP_NET_BIND_SERVICE: "listen on a port below 1024"}

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def needed(port: int, netns: bool = True, probe: bool = True, identity: bool = True) -> set[int]:
    """What this run needs: `netns` if any named namespace is watched or probed from, `probe` if the prober runs,
    `identity` if guests are named from /proc."""
    caps = set()
    if probe:
        caps.add(CAP_NET_RAW)
    if netns:
        caps.add(CAP_SYS_ADMIN)
    if identity:
        caps |= {CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH}
    if 0 < port < 1024:
        caps.add(CAP_NET_BIND_SERVICE)
    return caps


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def current() -> tuple[int, int]:
    """(effective, permitted) of the calling thread, as 64-bit masks."""
    hdr, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    return (data[0].effective | data[1].effective << 32, data[0].permitted | data[1].permitted << 32)


def _capset(mask: int) -> None:
    hdr, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    for i in (0, 1):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _names(mask: int) -> str:
    return ",".join(NAMES.get(c, str(c)) for c in sorted(NAMES) if mask >> c & 1) or "-"


def drop(port: int, netns: bool = True, probe: bool = True, identity: bool = True) -> None:
    """Keep only what `needed(...)` lists (raising it into the effective set if it is only permitted, as with file
    capabilities on a non-root container user), log it once, and warn about what is missing."""
    keep = needed(port, netns, probe, identity)
    keep_mask = sum(1 << c for c in keep)
    try:
        effective, permitted = current()
    except OSError as exc:
        logs.event(log, "privileges_unknown", logging.WARNING, error=exc)
        return
    if os.geteuid() == 0:
        logs.event(log, "privileges", running_as="root",
                   needs=";".join(f"{NAMES[c]}={WHY[c]}" for c in sorted(keep)))
    if threading.active_count() > 1:
        logs.event(log, "privileges_not_dropped", logging.WARNING, reason="threads already running")
    elif permitted != (keep_mask & permitted) or effective != (keep_mask & permitted):
        try:
            if permitted >> CAP_SETPCAP & 1:  # emptying the bounding set needs CAP_SETPCAP, so it goes first
                for cap in range(_last_cap() + 1):
                    if cap not in keep and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                        err = ctypes.get_errno()
                        if err != 22:  # EINVAL: the kernel does not know this capability
                            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")
            _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
            _capset(keep_mask & permitted)
            effective, permitted = current()
            logs.event(log, "privileges_dropped", kept=_names(permitted))
        except OSError as exc:
            logs.event(log, "privileges_not_dropped", logging.WARNING, error=exc)
    missing = keep_mask & ~effective
    if os.geteuid() == 0 and not netns:
        logs.event(log, "privileges_note", note="no named namespace: CAP_SYS_ADMIN dropped; "
                                                "a reload that adds one needs a restart")
    if missing:
        logs.event(log, "privileges_missing", logging.WARNING, missing=_names(missing),
                   effect="no raw ICMP without CAP_NET_RAW; no other namespaces without CAP_SYS_ADMIN; "
                          "fewer guest names without CAP_SYS_PTRACE/CAP_DAC_READ_SEARCH")
