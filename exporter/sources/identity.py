"""Which guest sits behind a tap: from running QEMU processes, libvirt's live domain XML, and the lab file.

    GuestDirectory(lab).lookup("seed-host") -> {"vm1eth0": GuestIdentity("vm1", "0a:e8:4f:c5:6a:16", "qemu")}

QEMU (`/proc/PID/cmdline` of every `qemu-system-*`, `qemu-kvm`):
- the guest's name from `-name vm1`, `-name guest=vm1,debug-threads=on` (libvirt) or `-name vm1,process=...`;
- its taps from `-netdev tap,id=n0,ifname=vm1eth0`, or, when the tap was opened by someone else and passed in
  (libvirt: `-netdev tap,fd=27,id=hostnet0`, multiqueue `fds=27:28`, or JSON `-netdev {"type":"tap","fd":"27"}`),
  from `/proc/PID/fdinfo/27`, whose `iff:` line names the tap. Taps that the command line does not name
  (`-netdev bridge`, `ifname=tap%d`) are found by scanning the process's `/dev/net/tun` descriptors;
- the MAC from the `-device ...,netdev=n0,mac=...` that uses the netdev (or `-nic tap,...,mac=`);
- the namespace: for a tap QEMU opened by name, QEMU's own (`/proc/PID/ns/net`: `ifname=` finds the device in the
  opener's namespace, and QEMU runs where it was started, `ip netns exec seed-host qemu-system-x86_64 ...`); for a
  tap passed in by descriptor, the descriptor's (TUNGETDEVNETNS on a pidfd_getfd copy; needs CAP_SYS_PTRACE and
  CAP_NET_ADMIN, else QEMU's own again).
libvirt: `/run/libvirt/qemu/*.xml` (`<domstatus pid=..><domain><name>`, `<interface><mac address=><target dev=>`).
Lab file: its guests' `device`, `name` and `mac`, in its `host_netns`.

Where sources disagree, live QEMU wins over libvirt over the lab file; a missing MAC is filled from the others.
The /proc scan is cached for `ttl` seconds, shared by all namespaces, and refreshed in the background.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from .. import logs
from kvmnet.common import netns as nsmod

log = logging.getLogger("kvmnet.identity")


class GuestIdentity(NamedTuple):
    name: str
    mac: str
    source: str  # "qemu" | "libvirt" | "lab"


# -- pure parsing ----------------------------------------------------------------------------------------------

def parse_opts(text: str, implied: str) -> dict[str, str]:
    """QEMU's option syntax: `tap,id=n0,ifname=x` with `,,` for a literal comma and an implied first key
    (`type` for -netdev, `driver` for -device, `guest` for -name). A JSON object (`{"type":"tap",...}`) too."""
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            return {}
        return {str(k): _json_str(v) for k, v in obj.items()} if isinstance(obj, dict) else {}
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    out: dict[str, str] = {}
    for n, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            if n == 0 and part:
                out[implied] = part
            continue
        out[key] = value
    return out


def _json_str(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


@dataclass
class Netdev:
    id: str
    type: str
    ifname: str = ""
    fds: list[int] = field(default_factory=list)
    mac: str = ""


@dataclass
class QemuArgs:
    name: str = ""
    netdevs: list[Netdev] = field(default_factory=list)


def is_qemu(argv: list[str]) -> bool:
    """qemu-system-* (Debian, upstream), qemu-kvm (RHEL's /usr/libexec/qemu-kvm), kvm (old Debian wrapper)."""
    base = os.path.basename(argv[0]) if argv else ""
    return base.startswith("qemu-system") or base in ("qemu-kvm", "kvm")


def _fds(value: str) -> list[int]:
    return [int(x) for x in value.split(":") if x.strip().isdigit()]


def parse_cmdline(argv: list[str]) -> QemuArgs:
    """A QEMU command line -> guest name and its tap-like netdevs with their MACs (no I/O)."""
    out = QemuArgs()
    nics: list[str] = []          # MACs of legacy `-net nic`, in order
    legacy_taps: list[Netdev] = []  # legacy `-net tap`, in order
    by_id: dict[str, Netdev] = {}
    macs: dict[str, str] = {}
    i = 1
    while i < len(argv):
        opt = argv[i]
        if opt.startswith("--"):
            opt = opt[1:]
        val = argv[i + 1] if i + 1 < len(argv) else ""
        if opt == "-name":
            out.name = parse_opts(val, "guest").get("guest", "")
        elif opt in ("-netdev", "-nic"):
            o = parse_opts(val, "type")
            nd = Netdev(id=o.get("id", ""), type=o.get("type", ""), ifname=o.get("ifname", ""),
                        fds=_fds(o.get("fds", "") or o.get("fd", "")), mac=o.get("mac", ""))
            out.netdevs.append(nd)
            if nd.id:
                by_id[nd.id] = nd
        elif opt == "-device":
            o = parse_opts(val, "driver")
            if o.get("netdev") and o.get("mac"):
                macs[o["netdev"]] = o["mac"]
        elif opt == "-net":
            o = parse_opts(val, "type")
            if o.get("type") == "nic":
                nics.append(o.get("macaddr", ""))
            elif o.get("type") in ("tap", "bridge"):
                nd = Netdev(id="", type=o["type"], ifname=o.get("ifname", ""), fds=_fds(o.get("fds", "") or o.get("fd", "")))
                legacy_taps.append(nd)
                out.netdevs.append(nd)
        else:
            i += 1
            continue
        i += 2
    for nid, mac in macs.items():
        if nid in by_id:
            by_id[nid].mac = mac
    for nd, mac in zip(legacy_taps, nics):
        nd.mac = nd.mac or mac
    out.netdevs = [nd for nd in out.netdevs if nd.type in ("tap", "bridge")]
    for nd in out.netdevs:
        nd.mac = nd.mac.lower()
        if "%" in nd.ifname:  # a template (tap%d): the kernel picked the name
            nd.ifname = ""
    return out


def parse_fdinfo(text: str) -> str | None:
    """The tap a /dev/net/tun descriptor is attached to: the `iff:` line of /proc/PID/fdinfo/N."""
    for line in text.splitlines():
        if line.startswith("iff:"):
            return line[4:].strip() or None
    return None


def resolve_taps(args: QemuArgs, fdinfo: Callable[[int], str | None],
                 tun_fds: Callable[[], list[int]], fds: dict[str, int] | None = None) -> dict[str, GuestIdentity]:
    """{tap: identity} of one QEMU process. `fdinfo(fd)` reads a descriptor's tap name; `tun_fds()` lists the
    process's /dev/net/tun descriptors, used only for netdevs the command line does not name. `fds`, if given,
    receives {tap: descriptor} for the taps found through a descriptor (their namespace can be asked of it)."""
    out: dict[str, GuestIdentity] = {}
    fds = {} if fds is None else fds
    unresolved: list[Netdev] = []
    for nd in args.netdevs:
        dev = nd.ifname
        for fd in nd.fds if not dev else ():
            dev = fdinfo(fd) or ""
            if dev:
                fds[dev] = fd
                break
        if dev:
            out[dev] = GuestIdentity(args.name, nd.mac, "qemu")
        else:
            unresolved.append(nd)
    if unresolved:
        known = {fd for nd in args.netdevs for fd in nd.fds}
        extra: list[tuple[str, int]] = []
        for fd in sorted(tun_fds()):
            dev = None if fd in known else fdinfo(fd)
            if dev and dev not in out and dev not in (d for d, _ in extra):
                extra.append((dev, fd))
        for nd, (dev, fd) in zip(unresolved, extra):  # descriptors are opened in command-line order
            out[dev] = GuestIdentity(args.name, nd.mac, "qemu")
            fds[dev] = fd
    return out


class Domain(NamedTuple):
    name: str
    pid: int | None
    interfaces: list[tuple[str, str]]  # (target dev, mac)


def parse_domain_xml(text: str) -> Domain | None:
    """libvirt's live status file (`<domstatus pid=..><domain>...`) or a plain `<domain>` document."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    dom = root if root.tag == "domain" else root.find("domain")
    if dom is None:
        return None
    pid = root.get("pid")
    ifaces = []
    for iface in dom.findall("./devices/interface"):
        target = iface.find("target")
        mac = iface.find("mac")
        dev = target.get("dev", "") if target is not None else ""
        if dev:
            ifaces.append((dev, (mac.get("address", "") if mac is not None else "").lower()))
    return Domain((dom.findtext("name") or "").strip(), int(pid) if pid and pid.isdigit() else None, ifaces)


# -- the directory ---------------------------------------------------------------------------------------------

TUNGETDEVNETNS = 0x54E3  # _IO('T', 227), <linux/if_tun.h>, Linux 5.2
_SYS_PIDFD_GETFD = 438   # Linux 5.6, same number on every architecture
_libc = ctypes.CDLL(None, use_errno=True)
_tun_ns_warned = False


def tap_netns_inode(pid: int, fd: int) -> int | None:
    """The namespace (nsfs inode) of the tap behind descriptor `fd` of process `pid`, or None if it cannot be
    asked: a copy of the descriptor (pidfd_getfd: CAP_SYS_PTRACE) and TUNGETDEVNETNS on it (CAP_NET_ADMIN)."""
    global _tun_ns_warned
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        tfd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if tfd < 0:
            return None
        try:
            nsfd = fcntl.ioctl(tfd, TUNGETDEVNETNS)
            try:
                return nsmod.inode_of_fd(nsfd)
            finally:
                os.close(nsfd)
        except OSError as exc:
            if not _tun_ns_warned:
                _tun_ns_warned = True
                logs.event(log, "tap_netns_unknown", error=exc,
                           hint="taps passed to QEMU by descriptor are placed in QEMU's namespace; "
                                "asking the descriptor needs CAP_NET_ADMIN")
            return None
        finally:
            os.close(tfd)
    finally:
        os.close(pidfd)

def _read(path: str, mode: str = "r") -> str | bytes | None:
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return None


def _ns_ino(path: str) -> int | None:
    return nsmod.inode_at(path)


class GuestDirectory:
    """tap -> guest, per namespace, from /proc, libvirt and the lab file. Thread-safe; scans at most every `ttl`."""

    def __init__(self, lab=None, proc: str = "/proc", libvirt_dir: str = "/run/libvirt/qemu",
                 ttl: float = 5.0, background: bool = True) -> None:
        self.lab = lab
        self.proc = proc
        self.libvirt_dir = libvirt_dir
        self.ttl = ttl
        # background: a stale scan is refreshed in a thread while lookups serve the previous one, so a scrape
        # never pays for a /proc walk (about 15 us a process) except the very first.
        self.background = background
        self._lock = threading.Lock()
        self._at: float | None = None
        self._refreshing = False
        self._live: list[tuple[int, str, GuestIdentity]] = []  # (netns inode, device, identity)

    def set_lab(self, lab) -> None:
        with self._lock:
            self.lab = lab

    def invalidate(self) -> None:
        """Forget the cached scan: the next lookup scans again, synchronously."""
        with self._lock:
            self._at = None

    def _refresh(self) -> None:
        try:
            live = self._scan_qemu() + self._scan_libvirt()
        except Exception as exc:  # noqa: BLE001 - names are a nicety: keep the last good scan, say why once a ttl
            log.warning("event=identity_scan_failed error=%r", str(exc))
            live = None
        with self._lock:
            self._refreshing = False
            self._at = time.monotonic()
            if live is not None:
                self._live = live

    def _current(self) -> list[tuple[int, str, GuestIdentity]]:
        with self._lock:
            stale = self._at is None or time.monotonic() - self._at >= self.ttl
            if not stale:
                return self._live
            if self._at is not None and self.background:
                if not self._refreshing:
                    self._refreshing = True
                    threading.Thread(target=self._refresh, name="kvmnet-identity", daemon=True).start()
                return self._live
        self._refresh()
        with self._lock:
            return self._live

    def lookup(self, netns_name: str) -> dict[str, GuestIdentity]:
        try:
            ino = nsmod.inode(netns_name)
        except nsmod.NetnsGone:
            return {}
        live = self._current()
        lab = self.lab
        out: dict[str, GuestIdentity] = {}
        if lab is not None and (getattr(lab, "host_netns", "") or "") == netns_name:
            for g in getattr(lab, "guests", []):
                if getattr(g, "device", ""):
                    out[g.device] = GuestIdentity(g.name, (g.mac or "").lower(), "lab")
        for source in ("libvirt", "qemu"):  # later wins
            for ns_ino, dev, ident in live:
                if ns_ino != ino or ident.source != source:
                    continue
                old = out.get(dev)
                if old is not None:
                    ident = GuestIdentity(ident.name or old.name, ident.mac or old.mac, ident.source)
                out[dev] = ident
        return out

    def _scan_qemu(self) -> list[tuple[int, str, GuestIdentity]]:
        out = []
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            return out
        for pid in pids:
            raw = _read(f"{self.proc}/{pid}/cmdline", "rb")
            if not raw or (b"qemu" not in raw[:256] and b"kvm" not in raw[:256]):
                continue
            # surrogateescape, not "replace": two -name values that differ only in undecodable bytes stay two
            # guests (the exposition maps those bytes to \xNN, README "Odd names")
            argv = [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]
            if not is_qemu(argv):
                continue
            ino = _ns_ino(f"{self.proc}/{pid}/ns/net")
            if ino is None:
                continue
            base = f"{self.proc}/{pid}"
            fds: dict[str, int] = {}
            taps = resolve_taps(parse_cmdline(argv), lambda fd: parse_fdinfo(_read(f"{base}/fdinfo/{fd}") or ""),
                                lambda: self._tun_fds(base), fds)
            for dev, ident in taps.items():
                # A tap passed in by descriptor may live in another namespace than QEMU (libvirt style, or QEMU
                # started outside the lab's namespace): ask the descriptor. A tap QEMU opened by name is in
                # QEMU's own namespace.
                tap_ino = tap_netns_inode(int(pid), fds[dev]) if dev in fds and self.proc == "/proc" else None
                out.append((tap_ino or ino, dev, ident))
        return out

    @staticmethod
    def _tun_fds(base: str) -> list[int]:
        fds = []
        try:
            names = os.listdir(f"{base}/fd")
        except OSError:
            return fds
        for n in names:
            try:
                if os.readlink(f"{base}/fd/{n}") == "/dev/net/tun":
                    fds.append(int(n))
            except (OSError, ValueError):
                pass
        return fds

    def _scan_libvirt(self) -> list[tuple[int, str, GuestIdentity]]:
        out = []
        try:
            files = sorted(f for f in os.listdir(self.libvirt_dir) if f.endswith(".xml"))
        except OSError:
            return out
        own = _ns_ino(f"{self.proc}/self/ns/net")
        for f in files:
            dom = parse_domain_xml(_read(os.path.join(self.libvirt_dir, f)) or "")
            if dom is None or not dom.name:
                continue
            ino = _ns_ino(f"{self.proc}/{dom.pid}/ns/net") if dom.pid else None
            ino = ino if ino is not None else own
            out.extend((ino, dev, GuestIdentity(dom.name, mac, "libvirt")) for dev, mac in dom.interfaces)
        return out
