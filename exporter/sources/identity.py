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
libvirt: each running libvirtd's (virtqemud's) files through /proc/PID/root (it may have a mount namespace of its
own), and `/run/libvirt/qemu` directly: `run/libvirt/qemu/*.xml` (`<domstatus state= reason= pid=..><domain><name>`,
`<interface><mac address=><target dev=>`: taps and macvtaps), `etc/libvirt/qemu/*.xml` (defined domains),
`var/log/libvirt/qemu/NAME.log` (why it last stopped), `var/lib/libvirt/dnsmasq/BRIDGE.status` (DHCP leases).
Lab file: its guests' `device`, `name` and `mac`, in its `host_netns`.
Proxmox: tapVMIDiN's guest also owns fwbrVMIDiN, fwlnVMIDiN and fwprVMIDpN (source "firewall").

Where sources disagree, live QEMU wins over libvirt over the lab file; a missing MAC is filled from the others. A
name is never empty and never shared: a nameless QEMU, or two QEMUs with one name in a namespace, are named after
their first tap. The /proc scan is cached for `ttl` seconds, shared by all namespaces, refreshed in the background,
and at once after invalidate(). Run states (`states()`): libvirt's files and QMP query-status, every `state_ttl`.
"""
from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import json
import logging
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvmnet.common import netns as nsmod

from .. import logs

log = logging.getLogger("kvmnet.identity")


class GuestIdentity(NamedTuple):
    name: str
    mac: str
    source: str  # "qemu" | "libvirt" | "lab" | "firewall" (a Proxmox firewall port or bridge of that guest)


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
                nd = Netdev(id="", type=o["type"], ifname=o.get("ifname", ""),
                            fds=_fds(o.get("fds", "") or o.get("fd", "")))
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
    state: str = ""   # <domstatus state=...>: running, paused, shutdown, crashed, pmsuspended, blocked, nostate
    reason: str = ""  # <domstatus reason=...>: user, booted, ...


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
    return Domain((dom.findtext("name") or "").strip(), int(pid) if pid and pid.isdigit() else None, ifaces,
                  root.get("state", "") if root is not dom else "", root.get("reason", "") if root is not dom else "")


# kvmnet_guest_state's states. libvirt's virDomainState names, "nostate" as unknown; a domain shut off after its
# QEMU crashed (libvirt: shut off, reason crashed) is "crashed", so that only an intentional stop reads "shutoff".
GUEST_STATES = ("running", "paused", "shutdown", "shutoff", "crashed", "pmsuspended", "blocked", "unknown")
_LIBVIRT_STATES = {"nostate": "unknown"}
# QMP query-status "status" (QAPI RunState) -> state
_QMP_STATES = {"running": "running", "paused": "paused", "prelaunch": "paused", "inmigrate": "paused",
               "postmigrate": "paused", "finish-migrate": "paused", "restore-vm": "paused", "save-vm": "paused",
               "debug": "paused", "io-error": "paused", "watchdog": "paused", "colo": "running",
               "suspended": "pmsuspended", "shutdown": "shutdown", "guest-panicked": "crashed",
               "internal-error": "crashed"}


def libvirt_state(state: str) -> str:
    state = _LIBVIRT_STATES.get(state, state)
    return state if state in GUEST_STATES else "unknown"


def qmp_state(status: str) -> str:
    return _QMP_STATES.get(status, "unknown")


def shutoff_reason(log_tail: str) -> str:
    """The reason of the last stop in a libvirt domain log (`... shutting down, reason=destroyed`), or ""."""
    reason = ""
    for line in log_tail.splitlines():
        _, sep, rest = line.partition("shutting down, reason=")
        if sep:
            reason = rest.strip()
    return reason


def qmp_socket(argv: list[str]) -> str:
    """The path of a QEMU's QMP server socket, or "": `-qmp unix:PATH,server=on,...` (kvmnet-setup's guests) or
    `-chardev socket,id=qmp,path=PATH,server=on -mon chardev=qmp,mode=control` (Proxmox's /var/run/qemu-server/
    VMID.qmp). Never libvirt's monitor (`-name guest=...`, or a path under libvirt's directories): libvirt holds
    that connection and a second client would only queue behind it."""
    chardevs: dict[str, str] = {}
    mons: list[str] = []
    for i, opt in enumerate(argv[:-1]):
        val = argv[i + 1]
        if opt in ("-name", "--name") and val.startswith("guest="):
            return ""
        if opt in ("-qmp", "--qmp") and val.startswith("unix:"):
            return parse_opts(val[5:], "path").get("path", "")
        if opt in ("-chardev", "--chardev"):
            o = parse_opts(val, "backend")
            if o.get("backend") == "socket" and o.get("path") and o.get("server", "off") in ("on", "yes", "") \
                    and "server" in o:
                chardevs[o.get("id", "")] = o["path"]
        elif opt in ("-mon", "--mon"):
            o = parse_opts(val, "chardev")
            if o.get("mode") == "control":
                mons.append(o.get("chardev", ""))
    for cid in mons:
        path = chardevs.get(cid, "")
        if path and "libvirt" not in path:
            return path
    return ""


def query_status(path: str, timeout: float = 0.5) -> str:
    """QMP query-status over a unix socket: the run state ("running", "paused", ...), or "" if it cannot be asked
    (not permitted, busy with another client past the timeout, gone)."""
    import socket as _socket
    try:
        with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in (b'{"execute":"qmp_capabilities"}\n', b'{"execute":"query-status"}\n'):
                f.write(cmd)
                f.flush()
                while True:  # skip asynchronous events
                    msg = json.loads(f.readline() or b"{}")
                    if "event" not in msg:
                        break
            ret = msg.get("return")
            return str(ret.get("status", "")) if isinstance(ret, dict) else ""
    except (OSError, ValueError):
        return ""


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


class _Libvirt(NamedTuple):
    """One libvirt daemon's directories, as this process sees them (through /proc/PID/root when it runs in
    another mount namespace), and its network namespace (where its shut-off domains are reported)."""
    run: str         # .../run/libvirt/qemu: <name>.xml live status of running and paused domains
    config: str      # .../etc/libvirt/qemu: <name>.xml of every defined domain; "" if unknown
    log: str         # .../var/log/libvirt/qemu: <name>.log, "shutting down, reason=..." lines; "" if unknown
    ns_ino: int
    dnsmasq: str = ""  # .../var/lib/libvirt/dnsmasq: <bridge>.status, the NAT networks' DHCP leases (JSON)


DAEMONS = ("libvirtd", "virtqemud")
CACHE_MAX = 4096  # parsed libvirt files kept (by path and mtime)
_PVE_TAP = re.compile(r"tap(\d+)i(\d+)")  # Proxmox VE: tap<vmid>i<netN>


class GuestDirectory:
    """tap -> guest, per namespace, from /proc, libvirt and the lab file; guest run states. Thread-safe; scans
    /proc at most every `ttl` (and at once after `invalidate()`, which the prober's discovery calls when netlink
    says a device appeared, vanished or changed); states at most every `state_ttl`."""

    def __init__(self, lab=None, proc: str = "/proc", libvirt_dir: str = "/run/libvirt/qemu",
                 ttl: float = 5.0, background: bool = True, state_ttl: float = 1.0) -> None:
        self.lab = lab
        self.proc = proc
        self.libvirt_dir = libvirt_dir
        self.ttl = ttl
        self.state_ttl = state_ttl
        # background: a stale scan is refreshed in a thread while lookups serve the previous one, so a scrape
        # never pays for a /proc walk (about 15 us a process) except the very first.
        self.background = background
        self._lock = threading.Lock()
        self._at: float | None = None
        self._refreshing = False
        self._live: list[tuple[int, str, GuestIdentity]] = []  # (netns inode, device, identity)
        self._fallback: dict[tuple[int, str], tuple[str, str]] = {}  # (netns inode, device) -> (QEMU pid, 1st tap)
        self._libvirts: list[_Libvirt] = []
        self._qmp: list[tuple[int, str, list[str], str]] = []  # (netns inode, socket, its taps, -name)
        self._state_lock = threading.Lock()
        self._states_at: float | None = None
        self._states: list[tuple[int, str, str, list[str]]] = []  # (netns inode, name, state, devices)
        self._xml_cache: dict[str, tuple[int, Domain | None]] = {}  # path -> (mtime_ns, parsed)
        self._reasons: dict[str, tuple[int, str]] = {}  # domain log path -> (mtime_ns, last stop reason)

    def set_lab(self, lab) -> None:
        with self._lock:
            self.lab = lab

    def invalidate(self) -> None:
        """Forget the cached scan: the next lookup scans again, synchronously."""
        with self._lock:
            self._at = None
        with self._state_lock:
            self._states_at = None

    def _refresh(self) -> None:
        try:
            qemus, daemons = self._processes()
            libvirts = self._libvirt_dirs(daemons)
            qmp: list[tuple[int, str, list[str], str]] = []
            fallback: dict[tuple[int, str], str] = {}
            live = self._scan_qemu(qemus, qmp, fallback) + self._scan_libvirt(libvirts)
        except Exception as exc:  # noqa: BLE001 - names are a nicety: keep the last good scan, say why once a ttl
            log.warning("event=identity_scan_failed error=%r", str(exc))
            live = None
        with self._lock:
            self._refreshing = False
            self._at = time.monotonic()
            if live is not None:
                self._live, self._libvirts, self._qmp, self._fallback = live, libvirts, qmp, fallback

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
        return self._lookup(ino, netns_name)

    def _lookup(self, ino: int, netns_name: str) -> dict[str, GuestIdentity]:
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
        # Never empty, never shared: a QEMU started without -name (as in the seed) and unnamed elsewhere, or two
        # QEMUs claiming one name in one namespace, are called after their first tap, which no other guest in
        # this namespace can have.
        fallback = self._fallback
        owners: dict[str, set[str]] = {}
        for dev, ident in out.items():
            if (ino, dev) in fallback:
                owners.setdefault(ident.name, set()).add(fallback[(ino, dev)][0])
        for dev, ident in out.items():
            f = fallback.get((ino, dev))
            if not ident.name or (f is not None and len(owners.get(ident.name, ())) > 1):
                out[dev] = ident._replace(name=f[1] if f is not None else dev)
        # Proxmox's guest firewall: tapNiM sits on its own bridge fwbrNiM, joined to vmbrX by the veth pair
        # fwprNpM (on vmbrX) <-> fwlnNiM (on fwbrNiM). Those three belong to the guest of tapNiM. Source
        # "firewall": discovery must not take the MACs learned on them for the guest's (they are everyone's).
        for dev, ident in list(out.items()):
            m = _PVE_TAP.fullmatch(dev)
            if m:
                vmid, n = m.groups()
                for fw in (f"fwbr{vmid}i{n}", f"fwln{vmid}i{n}", f"fwpr{vmid}p{n}"):
                    out.setdefault(fw, GuestIdentity(ident.name, "", "firewall"))
        return out

    # -- /proc -------------------------------------------------------------------------------------------------
    def _processes(self) -> tuple[list[tuple[str, list[str]]], list[str]]:
        """(QEMU processes as (pid, argv), libvirt daemon pids), one pass over /proc."""
        qemus, daemons = [], []
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            return qemus, daemons
        for pid in pids:
            raw = _read(f"{self.proc}/{pid}/cmdline", "rb")
            if not raw:
                continue
            head = raw[:256]
            if b"qemu" not in head and b"kvm" not in head and b"virt" not in head:
                continue
            # surrogateescape, not "replace": two -name values that differ only in undecodable bytes stay two
            # guests (the exposition maps those bytes to \xNN, README "Odd names")
            argv = [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]
            if is_qemu(argv):
                qemus.append((pid, argv))
            elif os.path.basename(argv[0]) in DAEMONS:
                daemons.append(pid)
        return qemus, daemons

    def _scan_qemu(self, qemus, qmp: list, fallback: dict) -> list[tuple[int, str, GuestIdentity]]:
        out = []
        for pid, argv in qemus:
            ino = _ns_ino(f"{self.proc}/{pid}/ns/net")
            if ino is None:
                continue
            base = f"{self.proc}/{pid}"
            fds: dict[str, int] = {}
            args = parse_cmdline(argv)
            # the lambdas are called inside resolve_taps, in this turn of the loop
            taps = resolve_taps(args, lambda fd: parse_fdinfo(_read(f"{base}/fdinfo/{fd}") or ""),  # noqa: B023
                                lambda: self._tun_fds(base), fds)  # noqa: B023
            devs = []
            for dev, ident in taps.items():
                # A tap passed in by descriptor may live in another namespace than QEMU (libvirt style, or QEMU
                # started outside the lab's namespace): ask the descriptor. A tap QEMU opened by name is in
                # QEMU's own namespace.
                tap_ino = tap_netns_inode(int(pid), fds[dev]) if dev in fds and self.proc == "/proc" else None
                out.append((tap_ino or ino, dev, ident))
                devs.append((tap_ino or ino, dev))
            for key in devs:
                fallback[key] = (pid, devs[0][1])
            sock = qmp_socket(argv)
            if sock:
                # The path is QEMU's: reach it through its root (it may run in another mount namespace).
                qmp.append((devs[0][0] if devs else ino, f"{base}/root{sock}" if sock.startswith("/") else "",
                            [d for _, d in devs], args.name))
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

    # -- libvirt -----------------------------------------------------------------------------------------------
    def _libvirt_dirs(self, daemons: list[str]) -> list[_Libvirt]:
        """`libvirt_dir` (for a daemon whose processes this exporter cannot see: /run/libvirt mounted into its
        container), then each running libvirtd's own, through /proc/PID/root: a libvirtd in a container or in a
        mount namespace of its own keeps its files where only its root shows them. The same directory seen twice
        (the host's libvirtd through its /proc root) counts once."""
        out: list[_Libvirt] = []
        seen: set[tuple[int, int]] = set()
        own = _ns_ino(f"{self.proc}/self/ns/net") or 0
        cands = [(self.libvirt_dir, "", "", own, "")]
        for pid in daemons:
            root = f"{self.proc}/{pid}/root"
            cands.append((f"{root}/run/libvirt/qemu", f"{root}/etc/libvirt/qemu", f"{root}/var/log/libvirt/qemu",
                          _ns_ino(f"{self.proc}/{pid}/ns/net") or own, f"{root}/var/lib/libvirt/dnsmasq"))
        for run, config, logdir, ino, dnsmasq in cands:
            try:
                st = os.stat(run)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                # Seen through libvirt_dir already: now its daemon is known, take its config and namespace.
                for i, lv in enumerate(out):
                    if lv.config == "" and config and _same(lv.run, run):
                        out[i] = _Libvirt(lv.run, config, logdir, ino, dnsmasq)
                continue
            seen.add(key)
            out.append(_Libvirt(run, config, logdir, ino, dnsmasq))
        return out

    def _domain(self, path: str) -> Domain | None:
        """A status or config file, parsed once per change (a status file is ~20 kB, mostly qemuCaps)."""
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            self._xml_cache.pop(path, None)
            return None
        hit = self._xml_cache.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        if len(self._xml_cache) > CACHE_MAX:  # domains come and go (transient ones under new names): stay bounded
            self._xml_cache.clear()
        dom = parse_domain_xml(_read(path) or "")
        self._xml_cache[path] = (mtime, dom)
        return dom

    def _status_files(self, lv: _Libvirt) -> list[str]:
        try:
            return sorted(os.path.join(lv.run, f) for f in os.listdir(lv.run) if f.endswith(".xml"))
        except OSError:
            return []

    def _scan_libvirt(self, libvirts: list[_Libvirt]) -> list[tuple[int, str, GuestIdentity]]:
        out = []
        with self._state_lock:
            for lv in libvirts:
                for path in self._status_files(lv):
                    dom = self._domain(path)
                    if dom is None or not dom.name:
                        continue
                    ino = _ns_ino(f"{self.proc}/{dom.pid}/ns/net") if dom.pid else None
                    ino = ino if ino is not None else lv.ns_ino
                    out.extend((ino, dev, GuestIdentity(dom.name, mac, "libvirt")) for dev, mac in dom.interfaces)
        return out

    def leases(self, netns_name: str) -> dict[tuple[str, str], Any]:
        """{(bridge, mac): address} from the DHCP leases of libvirt's NAT networks in this namespace (dnsmasq's
        status file per bridge, kept by libvirt's leaseshelper), unexpired ones only."""
        try:
            ino = nsmod.inode(netns_name)
        except nsmod.NetnsGone:
            return {}
        self._current()
        with self._lock:
            libvirts = self._libvirts
        out: dict[tuple[str, str], Any] = {}
        now = time.time()
        for lv in libvirts:
            if lv.ns_ino != ino or not lv.dnsmasq:
                continue
            try:
                files = [f for f in os.listdir(lv.dnsmasq) if f.endswith(".status")]
            except OSError:
                continue
            for f in files:
                out.update(parse_leases(f[:-7], _read(os.path.join(lv.dnsmasq, f)) or "", now))
        return out

    # -- run states --------------------------------------------------------------------------------------------
    def states(self, netns_name: str) -> dict[str, str]:
        """{guest: state} of the guests in one namespace whose run state is known: libvirt's domains (status
        files; a defined domain without one is shut off, or crashed if its log says so) and the QEMUs that have a
        `-qmp unix:` monitor (kvmnet-setup's), asked with query-status. Refreshed at most every `state_ttl`."""
        try:
            ino = nsmod.inode(netns_name)
        except nsmod.NetnsGone:
            return {}
        idents = self._lookup(ino, netns_name)
        with self._state_lock:
            if self._states_at is None or time.monotonic() - self._states_at >= self.state_ttl:
                self._states = self._scan_states()
                self._states_at = time.monotonic()
            states = self._states
        out: dict[str, str] = {}
        for s_ino, name, state, devs in states:
            if s_ino != ino:
                continue
            ident = next((idents[d] for d in devs if d in idents), None)
            out[ident.name if ident is not None else name or (devs[0] if devs else "")] = state
        out.pop("", None)
        return out

    def _stop_reason(self, lv: _Libvirt, name: str) -> str:
        """The domain log's last stop reason, read again only when the log changed (many shut-off domains)."""
        if not lv.log:
            return ""
        path = os.path.join(lv.log, f"{name}.log")
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return ""
        hit = self._reasons.get(path)
        if hit is None or hit[0] != mtime:
            if len(self._reasons) > CACHE_MAX:
                self._reasons.clear()
            hit = self._reasons[path] = (mtime, shutoff_reason(_tail(path)))
        return hit[1]

    def _scan_states(self) -> list[tuple[int, str, str, list[str]]]:
        with self._lock:
            libvirts, qmp = self._libvirts, self._qmp
        out = []
        for ino, sock, devs, name in qmp:
            status = query_status(sock) if sock and len(sock.encode()) < 108 else ""
            if status:
                out.append((ino, name, qmp_state(status), devs))
        for lv in libvirts:
            running = set()
            for path in self._status_files(lv):
                dom = self._domain(path)
                if dom is None or not dom.name:
                    continue
                running.add(dom.name)
                ino = _ns_ino(f"{self.proc}/{dom.pid}/ns/net") if dom.pid else None
                out.append((ino if ino is not None else lv.ns_ino, dom.name, libvirt_state(dom.state),
                            [d for d, _ in dom.interfaces]))
            if not lv.config:
                continue
            try:
                defined = sorted(f[:-4] for f in os.listdir(lv.config) if f.endswith(".xml"))
            except OSError:
                continue
            for name in defined:
                if name in running:
                    continue
                state = "crashed" if self._stop_reason(lv, name) in ("crashed", "failed") else "shutoff"
                out.append((lv.ns_ino, name, state, []))
        return out


def parse_leases(bridge: str, text: str, now: float) -> dict[tuple[str, str], Any]:
    """One dnsmasq status file (`[{"ip-address": ..., "mac-address": ..., "expiry-time": ...}]`) ->
    {(bridge, mac): address} of the leases not expired at `now`; anything malformed is skipped."""
    try:
        items = json.loads(text or "[]")
    except ValueError:
        return {}
    out: dict[tuple[str, str], Any] = {}
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        try:
            addr = ipaddress.ip_address(str(item.get("ip-address", "")))
            mac = str(item.get("mac-address", "")).lower()
            expiry = float(item.get("expiry-time", 0) or 0)
        except ValueError:
            continue
        if mac and (expiry == 0 or expiry > now):
            out[(bridge, mac)] = addr
    return out


def _same(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _tail(path: str, size: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
