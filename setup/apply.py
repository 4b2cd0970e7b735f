"""Carry out a plan with netlink (pyroute2), record what was created, undo it for `down` or a failed `up`.

Speed matters for labs with hundreds of ports (bench/bench_setup.py): one IPRoute socket per namespace, kept for
the whole run; namespaces are made in-process (unshare + bind mount, what `ip netns add` does) rather than by
forking; taps are made with the TUNSETIFF ioctl directly, because pyroute2 forks a child per tap inside a netns.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import grp
import os
import pwd
import secrets
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kvmnet.common import netns as nsmod
from kvmnet.common.lab import Lab
from kvmnet.common.netns import NETNS_RUN_DIR, entered, setns
from kvmnet.common.rtnl import Rtnl

from . import plan as planmod
from .plan import LIGHT_DEV, NAT_TABLE, Action, Link, Observed
from .state import State, hook_intent

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED = 4096, 16384, 1 << 20
MNT_DETACH = 2
IFF_UP = 1
# <linux/if_tun.h>
TUNSETIFF, TUNSETPERSIST, TUNSETOWNER, TUNSETGROUP = 0x400454CA, 0x400454CB, 0x400454CC, 0x400454CE
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100


class ApplyError(Exception):
    """`up` failed part-way; str() says which action and why, and that the run was rolled back."""


# --- namespaces, and whose they are ------------------------------------------------------------------------------

def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def ns_ident(ns: str) -> list[int] | None:
    """[st_dev, st_ino] of a named namespace ("" = the one this process runs in), or None if there is none."""
    try:
        st = os.stat(os.path.join(NETNS_RUN_DIR, ns) if ns else "/proc/thread-self/ns/net")
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


def _nsfs_dev() -> int:
    return os.stat("/proc/self/ns/net").st_dev  # every namespace inode lives on the one nsfs superblock


def ns_owner(item: dict) -> str:
    """Whose /run/netns/NAME is, for a recorded netns/light item: "ours" (the namespace we bound there), "half" (the
    empty placeholder we made, nothing bound: `up` was killed midway), "gone", or "foreign" (someone else's, e.g.
    deleted and re-created since, or a half-made `ip netns add` of theirs)."""
    path = os.path.join(NETNS_RUN_DIR, item["name"])
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "gone"
    ident = [st.st_dev, st.st_ino]
    if st.st_dev == _nsfs_dev():
        return "ours" if item.get("ino") == ident else "foreign"
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        if item.get("placeholder") == ident:
            return "half"
        # Killed between creating the placeholder and recording it: the record says we were about to make it, and
        # the file is no older than that intent.
        if "placeholder" not in item and "t" in item and st.st_ctime >= item["t"] - 0.05:
            return "half"
    return "foreign"


def is_namespace(name: str) -> bool:
    """/run/netns/NAME is a bound namespace, not a plain (half-made) file."""
    try:
        return os.lstat(os.path.join(NETNS_RUN_DIR, name)).st_dev == _nsfs_dev()
    except FileNotFoundError:
        return False


def netns_create(name: str, note: Callable[[dict], None] = lambda d: None) -> None:
    """`ip netns add NAME` in-process: an empty placeholder file, unshare this thread's network namespace, bind it
    onto the file, go back. `note` is told each identity as soon as it exists (placeholder, then namespace), before
    the next step, so a kill -9 anywhere leaves a record that tells our objects from anyone else's."""
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    run = NETNS_RUN_DIR.encode()
    # As iproute2: make /run/netns a shared mount so the bind survives into other mount namespaces.
    if _libc.mount(b"", run, b"none", MS_SHARED | MS_REC, None) != 0:
        _libc.mount(run, run, b"none", MS_BIND | MS_REC, None)
        _libc.mount(b"", run, b"none", MS_SHARED | MS_REC, None)
    path = os.path.join(NETNS_RUN_DIR, name)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)  # EEXIST: taken, not ours
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    placeholder = [st.st_dev, st.st_ino]
    try:
        note({"placeholder": placeholder})
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"unshare: {os.strerror(ctypes.get_errno())}")
            try:
                st = os.stat("/proc/thread-self/ns/net")
                note({"ino": [st.st_dev, st.st_ino]})
                if _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None) != 0:
                    raise OSError(ctypes.get_errno(), f"mount {path}: {os.strerror(ctypes.get_errno())}")
            finally:
                setns(home.__index__())
        finally:
            os.close(home)
    except BaseException:
        if ns_owner({"name": name, "placeholder": placeholder}) == "half":
            os.unlink(path)
        raise


def netns_pids(name: str) -> list[int]:
    """Processes living in the namespace (what `ip netns pids` does)."""
    ino = nsmod.inode_at(os.path.join(NETNS_RUN_DIR, name))
    if ino is None:
        return []
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and nsmod.pid_inode(pid) == ino]


def netns_delete(name: str) -> None:
    """Remove the name (umount + unlink). Never signals anyone: processes still inside keep the namespace alive
    until they exit, and they are not ours to kill (our QEMU guests are stopped by their own record items)."""
    path = os.path.join(NETNS_RUN_DIR, name)
    _libc.umount2(path.encode(), MNT_DETACH)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def link_owner(net: Net, item: dict, dumps: dict | None = None) -> str:
    """Whose the device a link item names is: "ours" (same name, the ifindex we chose, in the namespace we made it
    in), "gone", or "foreign". `dumps` caches one link dump per namespace while nothing changes (hundreds of taps)."""
    ns = item.get("ns", "")
    now = ns_ident(ns)
    if now is None or (item.get("nsino") and now != item["nsino"]):
        return "gone"  # its namespace went, and the device with it
    if dumps is None:
        dumps = {}
    if ns not in dumps:
        dumps[ns] = {name: index for name, (index, _) in net.raw(ns).links().items()}
    index = dumps[ns].get(item["name"])
    if index is None:
        return "gone"
    return "ours" if index == item.get("ifindex") else "foreign"


def new_ifindex() -> int:
    """An interface index picked before creating the device and recorded with the intent: the kernel allocates from
    the bottom, so a device carrying this index and the recorded name is the one we made."""
    return 0x1000000 + secrets.randbelow(0x7F000000)


# --- sockets ----------------------------------------------------------------------------------------------------

class Net:
    """One IPRoute socket per namespace, and an ifname -> index cache per namespace."""

    def __init__(self):
        self._sock: dict[str, IPRoute] = {}
        self._raw: dict[str, Rtnl] = {}
        self._nsfd: dict[str, int] = {}
        self._index: dict[str, dict[str, int]] = {}

    def raw(self, ns: str) -> Rtnl:
        """The lean socket for bulk requests (common/rtnl.py), also one per namespace."""
        s = self._raw.get(ns)
        if s is None:
            s = self._raw[ns] = Rtnl(ns)
        return s

    def nsfd(self, ns: str) -> int:
        if ns not in self._nsfd:
            path = os.path.join(NETNS_RUN_DIR, ns) if ns else "/proc/thread-self/ns/net"
            self._nsfd[ns] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return self._nsfd[ns]

    def ipr(self, ns: str) -> IPRoute:
        s = self._sock.get(ns)
        if s is None:
            with entered(ns):  # the socket keeps the namespace it was created in
                s = self._sock[ns] = IPRoute()
        return s

    def index(self, ns: str, name: str) -> int:
        cache = self._index.setdefault(ns, {})
        if name not in cache:
            cache[name] = self.ipr(ns).link("get", ifname=name)[0]["index"]
        return cache[name]

    def forget(self, ns: str, name: str | None = None) -> None:
        if name is None:
            self._index.pop(ns, None)
            for pool in (self._sock, self._raw):
                s = pool.pop(ns, None)
                if s is not None:
                    s.close()
            fd = self._nsfd.pop(ns, None)
            if fd is not None:
                os.close(fd)
        else:
            self._index.get(ns, {}).pop(name, None)

    def close(self) -> None:
        for s in [*self._sock.values(), *self._raw.values()]:
            s.close()
        for fd in self._nsfd.values():
            os.close(fd)
        self._sock.clear()
        self._raw.clear()
        self._nsfd.clear()
        self._index.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- observing --------------------------------------------------------------------------------------------------

def read_links(raw: Rtnl) -> dict[str, Link]:
    details = raw.link_details()
    names = {d["index"]: d["name"] for d in details}
    out = {d["name"]: Link(d["name"], d["kind"], names.get(d["master"]), bool(d["flags"] & IFF_UP), [], d["bridge"])
           for d in details}
    for index, address in raw.addresses():
        dev = names.get(index)
        if dev in out and not address.startswith("fe80:"):
            out[dev].addresses.append(address)
    return out


def default_route(ipr: IPRoute, links: dict[str, Link]) -> tuple[str | None, str | None]:
    """(device, gateway) of the IPv4 default route, or (None, None)."""
    for r in ipr.get_default_routes(family=2):
        oif, gw = r.get_attr("RTA_OIF"), r.get_attr("RTA_GATEWAY")
        if oif:
            return ipr.link("get", index=oif)[0].get_attr("IFLA_IFNAME"), gw
    return None, None


def observe(lab: Lab, net: Net, run_root: Path | None = None, state: State | None = None) -> Observed:
    obs = Observed()
    obs.namespaces = set(os.listdir(NETNS_RUN_DIR)) if os.path.isdir(NETNS_RUN_DIR) else set()
    obs.not_namespaces = {n for n in obs.namespaces if not is_namespace(n)}
    _ownership(obs, net, state)
    host = lab.host_netns
    for ns in ({host, lab.lan_netns} - {""}) | ({""} if lab.mode == "host" else set()):
        if ns and (ns not in obs.namespaces or ns in obs.not_namespaces):
            continue
        obs.links[ns] = read_links(net.raw(ns))
        obs.default_dev[ns], obs.default_gw[ns] = default_route(net.ipr(ns), obs.links[ns])
    links = obs.links.get(host, {})
    for g in lab.guests:
        if g.kind == "netns":
            if lab.guest_netns(g) in obs.ours_ns and _light_ok(lab, g, net, links, obs.namespaces):
                obs.light_ok.add(g.name)
        elif guest_alive(lab, g.name, run_root):
            obs.qemu_alive.add(g.name)
    if (lab.nat and (host in obs.namespaces or not host)
            and _run_in(host, ["nft", "list", "table", "inet", NAT_TABLE], check=False).returncode == 0):
        obs.nat.add(host)
    return obs


def _ownership(obs: Observed, net: Net, state: State | None) -> None:
    """What of the observed is ours, by the identities in the record (never by name alone)."""
    if state is None:
        return
    dumps: dict = {}
    ours = {i["name"] for i in state.created if i["op"] in ("netns", "light") and ns_owner(i) == "ours"}
    obs.ours_ns |= ours
    for item in state.created:
        op, ns = item["op"], item.get("ns", "")
        if op == "light" and item["name"] in ours and item.get("device"):
            obs.ours_links.setdefault(ns, set()).add(item["device"])
        elif op == "link" and (ns == "" or ns in ours) and link_owner(net, item, dumps) == "ours":
            obs.ours_links.setdefault(ns, set()).add(item["name"])
        elif op == "nat":
            obs.ours_nat.add(ns)


def _light_ok(lab: Lab, g, net: Net, links: dict[str, Link], namespaces: set[str]) -> bool:
    port = links.get(g.tap)
    gns = lab.guest_netns(g)
    if port is None or port.master != g.bridge or not port.up or gns not in namespaces:
        return False
    raw = net.raw(gns)  # the lean dump: hundreds of light guests are checked on every `up`
    try:
        inner = raw.links().get(LIGHT_DEV)
        ok = inner is not None and bool(inner[1] & IFF_UP) and (inner[0], str(g.address)) in raw.addresses()
    finally:
        net.forget(gns)
    return ok


def guest_dir(lab: str, run_root: Path | None = None) -> Path:
    """Where a lab's QEMU guests keep NAME.pid, NAME.qmp and NAME.log."""
    from .state import RUN_DIR
    return (run_root or RUN_DIR) / lab / "guests"


def guest_alive(lab: Lab, name: str, run_root: Path | None = None) -> bool:
    from . import guests
    return guests.alive(guest_dir(lab.name, run_root), name)


def _run_in(ns: str, argv: list[str], input: str | None = None, check: bool = True):
    # fork() copies the calling thread's namespaces, so the child runs inside `ns`.
    with entered(ns):
        p = subprocess.run(argv, input=input, capture_output=True, text=True)
    if check and p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines() or [f"exit status {p.returncode}"]
        raise OSError(f"{' '.join(argv)}: {lines[0]}")
    return p


# --- doing ------------------------------------------------------------------------------------------------------

IFF_TUN_EXCL = 0x8000  # TUNSETIFF fails with EBUSY instead of attaching to an existing device of that name


def _tap_create(ns: str, name: str, owner, group, multi_queue: bool, vnet_hdr: bool,
                note: Callable[[dict], None] = lambda d: None) -> None:
    flags = (IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL | (IFF_VNET_HDR if vnet_hdr else 0)
             | (IFF_MULTI_QUEUE if multi_queue else 0))
    with entered(ns):  # a tap is made in the namespace /dev/net/tun was opened in
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        except OSError as e:
            if e.errno == errno.EBUSY:  # someone else's tap (or tun) of that name: never attach to it
                raise OSError(errno.EEXIST, f"device {name} exists (not ours)") from None
            raise
        with entered(ns):
            index = socket.if_nametoindex(name)
        # Recorded while only this fd holds the tap: killed before TUNSETPERSIST, the kernel removes it with the fd.
        note({"ifindex": index})
        if owner is not None:
            fcntl.ioctl(fd, TUNSETOWNER, owner if isinstance(owner, int) else pwd.getpwnam(owner).pw_uid)
        if group is not None:
            fcntl.ioctl(fd, TUNSETGROUP, group if isinstance(group, int) else grp.getgrnam(group).gr_gid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)  # outlives this fd; QEMU attaches to it by name
    finally:
        os.close(fd)


def _ignore_missing(fn: Callable, *a, **kw) -> None:
    try:
        fn(*a, **kw)
    except NetlinkError as e:
        if e.code not in (errno.ENODEV, errno.EADDRNOTAVAIL, errno.ESRCH, errno.ENOENT, errno.EINVAL):
            raise


def _addr(ipr: IPRoute, cmd: str, index: int, address: str) -> None:
    ip, plen = address.split("/")
    try:
        ipr.addr(cmd, index=index, address=ip, prefixlen=int(plen))
    except NetlinkError as e:
        if not (cmd == "add" and e.code == errno.EEXIST):
            raise


class Applier:
    """Runs actions, records each one in `state` (on disk, before doing it) and in this run's journal (for rollback)."""

    def __init__(self, lab: Lab, net: Net, state: State, progress: Callable[[str], None] = lambda s: None,
                 run_root: Path | None = None):
        self.lab, self.net, self.state, self.progress = lab, net, state, progress
        self.run_root = run_root
        self.journal: list[dict] = []

    def record(self, item: dict) -> dict:
        """Write the intent to disk before the object is made; returns the item to note identities on."""
        if self.state.add(item):
            self.journal.append(item)
            self.state.save()
            hook_intent(item)
            return item
        return self.state.find(item) or item

    def note(self, item: dict, ident: dict) -> None:
        hook_intent(item, "made")
        item.update(ident)
        self.state.touch(item)
        self.state.save()

    def _dev(self, ns: str, name: str) -> dict:
        """The identity of the device a change is made to (a bridge's address, a port's master): from the record if
        this lab made it (no lookup: hundreds of taps), else asked of the kernel."""
        made = self.state.find({"op": "link", "ns": ns, "name": name})
        index = made["ifindex"] if made and made.get("ifindex") else self.net.index(ns, name)
        return {"ifindex": index, "nsino": ns_ident(ns)}

    def run(self, actions: list[Action]) -> None:
        # Hooks look up a tap's bridge in taps.json, so it must be on disk before any QEMU starts.
        for tap, bridge in self.lab.port_bridges().items():
            self.state.taps[tap] = {"bridge": bridge, "netns": self.lab.host_netns, "lab": self.lab.name}
        self.state.save()
        skip = False
        for i, act in enumerate(actions):
            if skip:  # the `up` already done together with the `master` before it
                skip = False
                continue
            try:
                nxt = actions[i + 1] if i + 1 < len(actions) else None
                if act.op == "master" and nxt and (nxt.op, nxt.ns, nxt.name) == ("up", act.ns, act.name):
                    self.do_master(act, up=True)  # one request instead of two, as `ip link set X master B up`
                    skip = True
                else:
                    getattr(self, "do_" + act.op)(act)
            except BaseException as e:  # Ctrl-C too: an interrupted `up` leaves nothing half-made
                msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
                if isinstance(e, NetlinkError):
                    msg = f"{os.strerror(e.code)} (netlink error {e.code})"
                n = len(self.journal)
                self.rollback()
                if not isinstance(e, Exception):
                    raise
                raise ApplyError(f"{act}: {msg}; rolled back the {n} change(s) this run made") from e
        self.state.save()

    def rollback(self) -> None:
        undo(list(self.journal), self.net, self.progress, state=self.state)
        for item in self.journal:
            self.state.remove(item)
        if not self.state.created:
            self.state.taps = {}
        self.journal = []
        self.state.save()

    # one method per plan op
    def do_netns_add(self, a: Action) -> None:
        item = self.record({"op": "netns", "name": a.name, "t": time.time()})
        netns_create(a.name, lambda ident: self.note(item, ident))
        ipr = self.net.ipr(a.name)
        ipr.link("set", index=self.net.index(a.name, "lo"), state="up")

    def _bridge_opts(self, stp: dict) -> dict:
        return {"br_stp_state": 1 if stp["enabled"] else 0, "br_forward_delay": round(stp["forward_delay"] * 100),
                "br_hello_time": round(stp["hello_time"] * 100), "br_max_age": round(stp["max_age"] * 100),
                "br_priority": stp["priority"]}

    def _link(self, ns: str, name: str, **extra) -> dict:
        return self.record({"op": "link", "ns": ns, "name": name, "ifindex": new_ifindex(), "nsino": ns_ident(ns),
                            **extra})

    def do_bridge_add(self, a: Action) -> None:
        item = self._link(a.ns, a.name)
        self.net.ipr(a.ns).link("add", ifname=a.name, index=item["ifindex"], kind="bridge",
                                **self._bridge_opts(a.args["stp"]))
        self._fdb_limit(a)

    def do_bridge_set(self, a: Action) -> None:
        self.net.ipr(a.ns).link("set", index=self.net.index(a.ns, a.name), kind="bridge",
                                **self._bridge_opts(a.args["stp"]))
        self._fdb_limit(a)

    def _fdb_limit(self, a: Action) -> None:
        limit = a.args.get("fdb_max_learned")
        if limit is None:
            return
        raw = self.net.raw(a.ns)
        raw.bridge_fdb_max_learned(self.net.index(a.ns, a.name), limit)
        # Kernels before 6.8 ignore the attribute silently: check it stuck, or `up` would never converge.
        got = next((d["bridge"] or {}).get("fdb_max_learned") for d in raw.link_details() if d["name"] == a.name)
        if got != limit:
            raise ApplyError(f"bridge {a.name}: fdb_max_learned {limit} not taken by this kernel (needs 6.8+)")

    def do_veth_add(self, a: Action) -> None:
        peer_ns = a.args.get("peer_ns") or "/proc/thread-self/ns/net"
        item = self._link(a.ns, a.name)  # the pair goes together: the host end's identity stands for both
        self.net.ipr(a.ns).link("add", ifname=a.name, index=item["ifindex"], kind="veth",
                                peer={"ifname": a.args["peer"], "net_ns_fd": peer_ns})

    def do_tap_add(self, a: Action) -> None:
        x = a.args
        # TUNSETIFF cannot be given an index: the tap's is recorded once it exists, before it is made persistent.
        item = self.record({"op": "link", "ns": a.ns, "name": a.name, "nsino": ns_ident(a.ns)})
        _tap_create(a.ns, a.name, x.get("owner"), x.get("group"), x.get("multi_queue"), x.get("vnet_hdr", True),
                    lambda ident: self.note(item, ident))

    def do_addr_add(self, a: Action) -> None:
        self.record({"op": "addr", "ns": a.ns, "dev": a.name, "address": a.args["address"],
                     **self._dev(a.ns, a.name)})
        _addr(self.net.ipr(a.ns), "add", self.net.index(a.ns, a.name), a.args["address"])

    def do_addr_flush(self, a: Action) -> None:
        # The seed's `ip addr flush dev eth1`; undone by putting the addresses back. Recorded first: a kill -9
        # after the flush must not lose the uplink's addresses.
        idx = self.net.index(a.ns, a.name)
        self.record({"op": "flushed", "ns": a.ns, "dev": a.name, "addresses": a.args["addresses"],
                     "gateway": a.args.get("gateway"), "ifindex": idx})
        for address in a.args["addresses"]:
            _addr(self.net.ipr(a.ns), "del", idx, address)

    def do_route_add(self, a: Action) -> None:
        self.record({"op": "route", "ns": a.ns, "dev": a.name, "gateway": a.args["gateway"],
                     **self._dev(a.ns, a.name)})
        try:
            self.net.ipr(a.ns).route("add", dst="0.0.0.0/0", gateway=a.args["gateway"],
                                     oif=self.net.index(a.ns, a.name))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    def do_master(self, a: Action, up: bool | None = None) -> None:
        self.record({"op": "master", "ns": a.ns, "name": a.name, **self._dev(a.ns, a.name)})
        self.net.raw(a.ns).link_set(a.name, master=self.net.index(a.ns, a.args["bridge"]), up=up)

    def do_up(self, a: Action) -> None:
        self.net.raw(a.ns).link_set(a.name, up=True)

    def do_light_del(self, a: Action) -> None:
        # plan() checked the namespace is ours; undo() checks again, by identity, before removing anything.
        gns = a.args["netns"]
        items = [i for i in self.state.created if i["op"] == "light" and i["name"] == gns]
        self.net.forget(gns)
        undo(items, self.net, self.progress, state=self.state, ports=True)
        for i in items:
            self.state.remove(i)
        self.net.forget(a.ns, a.args["device"])
        self.state.save()

    def do_light_add(self, a: Action) -> None:
        x, gns = a.args, a.args["netns"]
        item = self.record({"op": "light", "ns": a.ns, "name": gns, "device": x["device"], "t": time.time(),
                            "ifindex": new_ifindex(), "nsino": ns_ident(a.ns)})
        netns_create(gns, lambda ident: self.note(item, ident))
        g = self.net.raw(gns)
        # Create the pair from inside the guest: its end (with the guest's MAC, up) stays there at ifindex 2 (lo is
        # 1 in a new namespace), the port goes to the host namespace at the index recorded above; the address then
        # goes on by index, no lookup.
        g.veth_add(LIGHT_DEV, 2, x["mac"], x["device"], self.net.nsfd(a.ns), peer_index=item["ifindex"])
        g.addr_add(2, x["address"])
        g.link_up_index(1)
        if x.get("gateway"):
            self.net.ipr(gns).route("add", dst="0.0.0.0/0", gateway=x["gateway"], oif=2)
        self.net.raw(a.ns).link_set(x["device"], master=self.net.index(a.ns, x["bridge"]), up=True)
        # Done with this namespace: keep the fd count flat across hundreds of guests.
        self.net.forget(gns)

    def do_nat_add(self, a: Action) -> None:
        x = a.args
        item = self.record({"op": "sysctl", "ns": a.ns, "key": "net/ipv4/ip_forward", "nsino": ns_ident(a.ns)})
        # per namespace: opened from inside it
        with entered(a.ns), open("/proc/sys/net/ipv4/ip_forward", "r+") as f:
            if "old" not in item:  # a repeated nat_add keeps the value from before the first
                self.note(item, {"old": f.read().strip()})
            f.seek(0)
            f.write("1")
        # Masquerade what leaves by the uplink from the bridge's subnet; forward only replies back in, so the WAN
        # cannot open connections to guests even with a route to them.
        script = f"""table inet {NAT_TABLE} {{
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    ip saddr {x['network']} oifname "{x['out']}" masquerade
  }}
  chain forward {{ type filter hook forward priority filter; policy accept;
    iifname "{x['out']}" oifname "{x['bridge']}" ct state established,related accept
    iifname "{x['out']}" oifname "{x['bridge']}" drop
  }}
}}
"""
        self.record({"op": "nat", "ns": a.ns, "table": NAT_TABLE, "nsino": ns_ident(a.ns)})
        # `nft -f` with `table` adds to an existing table: plan() refused if one not ours was there.
        _run_in(a.ns, ["nft", "-f", "-"], input=script)

    def do_guest_start(self, a: Action) -> None:
        from . import guests, qemu
        g = next(g for g in self.lab.guests if g.name == a.name)
        run_dir = guest_dir(self.lab.name, self.run_root)
        # Recorded (on disk) first: if `up` dies while QEMU starts, `down` still finds it by its pidfile path, which
        # is on its command line.
        item = self.record({"op": "guest", "name": g.name, "ns": a.ns, "run_dir": str(run_dir),
                            "pidfile": str(qemu.paths(run_dir, g.name)["pid"])})
        pid = guests.start(self.lab, g, run_dir, self.progress)
        self.note(item, {"pid": pid, "start": qemu.start_time(pid)})


# --- undoing ----------------------------------------------------------------------------------------------------

def _warn(msg: str) -> None:
    import sys
    print(f"kvmnet-setup: warning: {msg}", file=sys.stderr, flush=True)


def _index_now(net: Net, ns: str, name: str) -> int | None:
    try:
        return net.ipr(ns).link("get", ifname=name)[0]["index"]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def undo(items: list[dict], net: Net, progress: Callable[[str], None] = lambda s: None, state: State | None = None,
         warn: Callable[[str], None] = _warn, failed: list[dict] | None = None, ports: bool = False) -> list[str]:
    """Undo recorded items, newest first, each only if what is there now is what we made (by identity: the
    namespace's inode, the device's ifindex, the process's start time). Something else under a recorded name is
    left alone, with a warning. Items inside a namespace that is itself being deleted go with it.
    Returns the problems met (an item already gone is not a problem); the items they concern go to `failed`, so
    the record keeps them for the next `down`. With `ports`, a light guest's port is deleted at once, not with its
    namespace when the kernel gets round to freeing it (one veth deletion is ~15 ms: only when the name is reused
    right away)."""
    owner = {i["name"]: ns_owner(i) for i in items if i["op"] in ("netns", "light")}
    problems = []
    failed = [] if failed is None else failed
    here = ns_ident("")
    for item in reversed(items):
        op, ns = item["op"], item.get("ns", "")
        if op not in ("netns", "light", "guest") and ns in owner:
            continue  # goes with its namespace (or, if that is someone else's now, was never in it)
        hook_intent(item, "undo")
        try:
            if op == "guest":
                from . import guests
                progress(f"stopping QEMU guest {item['name']}")
                guests.stop(item["run_dir"], item["name"], start=item.get("start"))
            elif op in ("netns", "light"):
                name, how = item["name"], owner[item["name"]]
                if how == "ours":
                    net.forget(name)
                    if ports and op == "light" and item.get("ifindex") and ns_ident(ns) == item.get("nsino"):
                        # The port in the host namespace, by the index we gave it (a light guest made again reuses
                        # the port's name).
                        if _index_now(net, ns, item["device"]) == item["ifindex"]:
                            _ignore_missing(net.ipr(ns).link, "del", index=item["ifindex"])
                        net.forget(ns, item["device"])
                    if op == "netns":
                        others = netns_pids(name)
                        if others:
                            warn(f"namespace {name}: processes kvmnet-setup did not start still run in it (pids "
                                 f"{', '.join(map(str, others[:5]))}); its name is removed, the namespace ends when "
                                 "they exit")
                    netns_delete(name)
                elif how == "half":
                    os.unlink(os.path.join(NETNS_RUN_DIR, name))  # our placeholder; `up` died before binding it
                elif how == "foreign" and "ino" in item:  # (without "ino" we never made it: nothing to say)
                    warn(f"namespace {name}: not the one this lab made (removed and re-created by someone else?); "
                         "left alone")
            elif not ns and item.get("nsino") and item["nsino"] != here:
                # Host mode, run from another namespace than `up` was: these are not the devices it changed.
                problems.append(f"{op} {item.get('name') or item.get('dev')}: recorded in another network namespace "
                                "than this run's; run `down` where `up` ran")
                failed.append(item)
            elif (ns and not netns_exists(ns)) or ("nsino" in item and ns_ident(ns) != item["nsino"]):
                continue  # its namespace is gone, or is someone else's now (ours died with the one we made)
            elif op == "link":
                how = link_owner(net, item)
                if how == "ours":
                    _ignore_missing(net.ipr(ns).link, "del", index=item["ifindex"])
                    net.forget(ns, item["name"])
                # "foreign": a namesake, not ours (or our create never happened): left alone
            elif op in ("addr", "flushed", "route", "master"):
                dev = item.get("dev") or item["name"]
                index = _index_now(net, ns, dev)
                if index is None or ("ifindex" in item and index != item["ifindex"]):
                    continue  # the device we changed is gone; one of that name now is not it
                if op == "addr":
                    _ignore_missing(_addr, net.ipr(ns), "del", index, item["address"])
                elif op == "flushed":
                    for address in item["addresses"]:
                        _addr(net.ipr(ns), "add", index, address)
                    if item.get("gateway"):
                        try:
                            net.ipr(ns).route("add", dst="0.0.0.0/0", gateway=item["gateway"], oif=index)
                        except NetlinkError as e:
                            if e.code != errno.EEXIST:
                                raise
                elif op == "route":
                    _ignore_missing(net.ipr(ns).route, "del", dst="0.0.0.0/0", gateway=item["gateway"], oif=index)
                else:
                    _ignore_missing(net.ipr(ns).link, "set", index=index, master=0)
            elif op == "nat":
                _run_in(ns, ["nft", "delete", "table", "inet", item["table"]], check=False)
            elif op == "sysctl" and "old" in item:
                with entered(ns):
                    f = Path("/proc/sys", item["key"])
                    # Put back what was there only if it is still what we set, and no other lab relies on it.
                    if f.read_text().strip() == "1" and not _sysctl_shared(item, state):
                        f.write_text(item["old"])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                problems.append(f"{op} {item.get('name') or item.get('dev')}: {os.strerror(e.code)}")
                failed.append(item)
        except Exception as e:  # keep going: down must remove everything it can
            problems.append(f"{op} {item.get('name') or item.get('dev')}: {e}")
            failed.append(item)
    return problems


def _sysctl_shared(item: dict, state: State | None) -> bool:
    """Another lab's record also set this sysctl in this namespace (host mode: several labs, one ip_forward)."""
    from .state import RUN_DIR
    root = state.dir.parent if state is not None else RUN_DIR
    for other in sorted(root.glob("*/state.json")):
        if state is not None and other.parent == state.dir:
            continue
        try:
            items = State(other.parent.name, root=root).created
        except Exception:  # unreadable: assume it may rely on it
            return True
        if any(i.get("op") == "sysctl" and i.get("key") == item["key"] and i.get("nsino") == item.get("nsino")
               for i in items):
            return True
    return False


def reconcile(state: State, net: Net, warn: Callable[[str], None] = _warn) -> None:
    """After a kill -9 (or someone else's hand): drop from the record what is gone or not ours, and remove our own
    half-made namespace files, so `up` neither adopts a namesake nor trips over its own leftovers."""
    keep, dead = [], set()
    dumps: dict = {}
    for item in state.created:
        op = item["op"]
        if op in ("netns", "light"):
            how = ns_owner(item)
            if how == "ours":
                keep.append(item)
                continue
            if how == "half":
                os.unlink(os.path.join(NETNS_RUN_DIR, item["name"]))
            elif how == "foreign" and "ino" in item:
                warn(f"namespace {item['name']}: not the one this lab made (removed and re-created by someone "
                     "else?); dropped from the record, left alone")
            dead.add(item["name"])
        elif op == "link":
            how = "gone" if item.get("ns", "") in dead else link_owner(net, item, dumps)
            if how == "ours":
                keep.append(item)
        else:
            keep.append(item)
    # Changes to devices inside a namespace that went are gone with it; QEMU guests are kept: found by pidfile.
    keep = [i for i in keep if i["op"] in ("guest", "netns", "light") or i.get("ns", "") not in dead]
    if len(keep) != len(state.created):
        for item in [i for i in state.created if i not in keep]:
            state.remove(item)
        state.save()


def up(lab: Lab, state: State, force: bool = False, progress: Callable[[str], None] = lambda s: None,
       dry_run: bool = False, run_root: Path | None = None) -> list[Action]:
    with Net() as net:
        if not dry_run:
            reconcile(state, net)
        actions = planmod.plan(lab, observe(lab, net, run_root, state), force=force)
        if not dry_run and actions:
            Applier(lab, net, state, progress, run_root).run(actions)
        return actions


def wait_guests(lab: Lab, names: list[str], timeout: float, progress: Callable[[str], None]) -> list[str]:
    """Ping each started QEMU guest from the host namespace until it answers (a TCG boot takes ~7 s).
    Returns the problems; a guest whose bridge has no address in its subnet cannot be pinged and is skipped."""
    from . import qemu
    bridges = {b.name: b for b in lab.bridges}
    problems = []
    end = time.monotonic() + timeout
    for g in (g for g in lab.guests if g.name in names):
        br = bridges[g.bridge].address
        if br is None or g.address.ip not in br.network:
            continue
        try:
            qemu.wait_for_ping(lab.host_netns, str(g.address.ip), max(1.0, end - time.monotonic()),
                               progress=progress, name=g.name)
        except TimeoutError as e:
            log = guest_dir(lab.name) / f"{g.name}.log"
            problems.append(f"{e} (QEMU runs; its console is in {log})")
    return problems


def down(state: State, progress: Callable[[str], None] = lambda s: None,
         warn: Callable[[str], None] = _warn) -> tuple[int, list[str]]:
    with Net() as net:
        n = len(state.created)
        failed: list[dict] = []
        problems = undo(state.created, net, progress, state=state, warn=warn, failed=failed)
    if failed:  # keep what could not be undone (a QEMU that survived SIGKILL...): the next `down` tries again
        state.created = [i for i in state.created if i in failed]
        state.rewrite()
        state.save()
        return n - len(failed), problems
    state.created, state.taps = [], {}
    state.clear()
    return n, problems


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
