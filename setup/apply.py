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
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kvmnet.common import netns as nsmod
from kvmnet.common.netns import NETNS_RUN_DIR, entered, setns

from . import plan as planmod
from .plan import LIGHT_DEV, NAT_TABLE, Action, Link, Observed
from kvmnet.common.rtnl import Rtnl
from kvmnet.common.lab import Lab
from .state import State

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


# --- namespaces -------------------------------------------------------------------------------------------------

def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def netns_create(name: str) -> None:
    """`ip netns add NAME` in-process: unshare this thread's network namespace, bind it, go back."""
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    run = NETNS_RUN_DIR.encode()
    # As iproute2: make /run/netns a shared mount so the bind survives into other mount namespaces.
    if _libc.mount(b"", run, b"none", MS_SHARED | MS_REC, None) != 0:
        _libc.mount(run, run, b"none", MS_BIND | MS_REC, None)
        _libc.mount(b"", run, b"none", MS_SHARED | MS_REC, None)
    path = os.path.join(NETNS_RUN_DIR, name)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"unshare: {os.strerror(ctypes.get_errno())}")
        try:
            if _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None) != 0:
                raise OSError(ctypes.get_errno(), f"mount {path}: {os.strerror(ctypes.get_errno())}")
        finally:
            setns(home.__index__())
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(home)


def netns_pids(name: str) -> list[int]:
    """Processes living in the namespace (what `ip netns pids` does)."""
    ino = nsmod.inode_at(os.path.join(NETNS_RUN_DIR, name))
    if ino is None:
        return []
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and nsmod.pid_inode(pid) == ino]


def netns_delete(name: str, kill: bool = True) -> None:
    if kill:
        for pid in netns_pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    path = os.path.join(NETNS_RUN_DIR, name)
    _libc.umount2(path.encode(), MNT_DETACH)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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


def observe(lab: Lab, net: Net, run_root: Path | None = None) -> Observed:
    obs = Observed()
    obs.namespaces = set(os.listdir(NETNS_RUN_DIR)) if os.path.isdir(NETNS_RUN_DIR) else set()
    host = lab.host_netns
    for ns in ({host, lab.lan_netns} - {""}) | ({""} if lab.mode == "host" else set()):
        if ns and ns not in obs.namespaces:
            continue
        obs.links[ns] = read_links(net.raw(ns))
        obs.default_dev[ns], obs.default_gw[ns] = default_route(net.ipr(ns), obs.links[ns])
    links = obs.links.get(host, {})
    for g in lab.guests:
        if g.kind == "netns":
            if _light_ok(lab, g, net, links, obs.namespaces):
                obs.light_ok.add(g.name)
        elif guest_alive(lab, g.name, run_root):
            obs.qemu_alive.add(g.name)
    if lab.nat and (host in obs.namespaces or not host):
        if _run_in(host, ["nft", "list", "table", "inet", NAT_TABLE], check=False).returncode == 0:
            obs.nat.add(host)
    return obs


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

def _tap_create(ns: str, name: str, owner, group, multi_queue: bool, vnet_hdr: bool) -> None:
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0) | (IFF_MULTI_QUEUE if multi_queue else 0)
    with entered(ns):  # a tap is made in the namespace /dev/net/tun was opened in
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
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
    """Runs actions, records each creation in `state` and in this run's journal (for rollback)."""

    def __init__(self, lab: Lab, net: Net, state: State, progress: Callable[[str], None] = lambda s: None,
                 run_root: Path | None = None):
        self.lab, self.net, self.state, self.progress = lab, net, state, progress
        self.run_root = run_root
        self.journal: list[dict] = []

    def record(self, item: dict) -> None:
        if self.state.add(item):
            self.journal.append(item)

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
                if act.op == "guest_start":
                    self.state.save()  # guests are slow: keep what is done so far on disk
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
        undo(list(self.journal), self.net, self.progress)
        for item in self.journal:
            self.state.remove(item)
        if not self.state.created:
            self.state.taps = {}
        self.journal = []
        self.state.save()

    # one method per plan op
    def do_netns_add(self, a: Action) -> None:
        netns_create(a.name)
        self.record({"op": "netns", "name": a.name})
        ipr = self.net.ipr(a.name)
        ipr.link("set", index=self.net.index(a.name, "lo"), state="up")

    def _bridge_opts(self, stp: dict) -> dict:
        return {"br_stp_state": 1 if stp["enabled"] else 0, "br_forward_delay": round(stp["forward_delay"] * 100),
                "br_hello_time": round(stp["hello_time"] * 100), "br_max_age": round(stp["max_age"] * 100),
                "br_priority": stp["priority"]}

    def do_bridge_add(self, a: Action) -> None:
        self.net.ipr(a.ns).link("add", ifname=a.name, kind="bridge", **self._bridge_opts(a.args["stp"]))
        self.record({"op": "link", "ns": a.ns, "name": a.name})
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
        self.net.ipr(a.ns).link("add", ifname=a.name, kind="veth",
                                peer={"ifname": a.args["peer"], "net_ns_fd": peer_ns})
        self.record({"op": "link", "ns": a.ns, "name": a.name})

    def do_tap_add(self, a: Action) -> None:
        x = a.args
        _tap_create(a.ns, a.name, x.get("owner"), x.get("group"), x.get("multi_queue"), x.get("vnet_hdr", True))
        self.record({"op": "link", "ns": a.ns, "name": a.name})

    def do_addr_add(self, a: Action) -> None:
        _addr(self.net.ipr(a.ns), "add", self.net.index(a.ns, a.name), a.args["address"])
        self.record({"op": "addr", "ns": a.ns, "dev": a.name, "address": a.args["address"]})

    def do_addr_flush(self, a: Action) -> None:
        # The seed's `ip addr flush dev eth1`; undone by putting the addresses back.
        idx = self.net.index(a.ns, a.name)
        for address in a.args["addresses"]:
            _addr(self.net.ipr(a.ns), "del", idx, address)
        self.record({"op": "flushed", "ns": a.ns, "dev": a.name, "addresses": a.args["addresses"],
                     "gateway": a.args.get("gateway")})

    def do_route_add(self, a: Action) -> None:
        try:
            self.net.ipr(a.ns).route("add", dst="0.0.0.0/0", gateway=a.args["gateway"],
                                     oif=self.net.index(a.ns, a.name))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        self.record({"op": "route", "ns": a.ns, "dev": a.name, "gateway": a.args["gateway"]})

    def do_master(self, a: Action, up: bool | None = None) -> None:
        self.net.raw(a.ns).link_set(a.name, master=self.net.index(a.ns, a.args["bridge"]), up=up)
        self.record({"op": "master", "ns": a.ns, "name": a.name})

    def do_up(self, a: Action) -> None:
        self.net.raw(a.ns).link_set(a.name, up=True)

    def do_light_del(self, a: Action) -> None:
        _ignore_missing(self.net.ipr(a.ns).link, "del", ifname=a.args["device"])
        self.net.forget(a.ns, a.args["device"])
        self.net.forget(a.args["netns"])
        netns_delete(a.args["netns"])

    def do_light_add(self, a: Action) -> None:
        x, gns = a.args, a.args["netns"]
        netns_create(gns)
        self.record({"op": "light", "name": gns})
        g = self.net.raw(gns)
        # Create the pair from inside the guest: its end (with the guest's MAC, up) stays there at ifindex 2 (lo is
        # 1 in a new namespace), the port goes to the host namespace; the address then goes on by index, no lookup.
        g.veth_add(LIGHT_DEV, 2, x["mac"], x["device"], self.net.nsfd(a.ns))
        g.addr_add(2, x["address"])
        g.link_up_index(1)
        if x.get("gateway"):
            self.net.ipr(gns).route("add", dst="0.0.0.0/0", gateway=x["gateway"], oif=2)
        self.net.raw(a.ns).link_set(x["device"], master=self.net.index(a.ns, x["bridge"]), up=True)
        # Done with this namespace: keep the fd count flat across hundreds of guests.
        self.net.forget(gns)

    def do_nat_add(self, a: Action) -> None:
        x = a.args
        with entered(a.ns):
            with open("/proc/sys/net/ipv4/ip_forward", "r+") as f:  # per namespace; opened from inside it
                old = f.read().strip()
                f.seek(0)
                f.write("1")
        self.record({"op": "sysctl", "ns": a.ns, "key": "net/ipv4/ip_forward", "old": old})
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
        _run_in(a.ns, ["nft", "-f", "-"], input=script)
        self.record({"op": "nat", "ns": a.ns, "table": NAT_TABLE})

    def do_guest_start(self, a: Action) -> None:
        from . import guests
        g = next(g for g in self.lab.guests if g.name == a.name)
        run_dir = guest_dir(self.lab.name, self.run_root)
        # Recorded first: if QEMU half-starts, the rollback still stops whatever the pidfile names.
        self.record({"op": "guest", "name": g.name, "ns": a.ns, "run_dir": str(run_dir)})
        guests.start(self.lab, g, run_dir, self.progress)


# --- undoing ----------------------------------------------------------------------------------------------------

def undo(items: list[dict], net: Net, progress: Callable[[str], None] = lambda s: None) -> list[str]:
    """Undo recorded items, newest first. Items inside a namespace that is itself being deleted go with it.
    Returns the problems met (an item already gone is not a problem)."""
    dying = {i["name"] for i in items if i["op"] in ("netns", "light")}
    problems = []
    for item in reversed(items):
        op, ns = item["op"], item.get("ns", "")
        if op not in ("netns", "light", "guest") and ns in dying:
            continue
        try:
            if op == "guest":
                from . import guests
                progress(f"stopping QEMU guest {item['name']}")
                guests.stop(item["run_dir"], item["name"])
            elif op in ("netns", "light"):
                net.forget(item["name"])
                # Nothing runs in a light guest's namespace; skipping the /proc scan keeps `down` fast at scale.
                netns_delete(item["name"], kill=(op == "netns"))
            elif ns and not netns_exists(ns):
                continue
            elif op == "link":
                _ignore_missing(net.ipr(ns).link, "del", ifname=item["name"])
                net.forget(ns, item["name"])
            elif op == "addr":
                _ignore_missing(_addr, net.ipr(ns), "del", net.index(ns, item["dev"]), item["address"])
            elif op == "flushed":
                for address in item["addresses"]:
                    _addr(net.ipr(ns), "add", net.index(ns, item["dev"]), address)
                if item.get("gateway"):
                    try:
                        net.ipr(ns).route("add", dst="0.0.0.0/0", gateway=item["gateway"],
                                          oif=net.index(ns, item["dev"]))
                    except NetlinkError as e:
                        if e.code != errno.EEXIST:
                            raise
            elif op == "route":
                _ignore_missing(net.ipr(ns).route, "del", dst="0.0.0.0/0", gateway=item["gateway"],
                                oif=net.index(ns, item["dev"]))
            elif op == "master":
                _ignore_missing(net.ipr(ns).link, "set", index=net.index(ns, item["name"]), master=0)
            elif op == "nat":
                _run_in(ns, ["nft", "delete", "table", "inet", item["table"]], check=False)
            elif op == "sysctl":
                with entered(ns):
                    Path("/proc/sys", item["key"]).write_text(item["old"])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                problems.append(f"{op} {item}: {os.strerror(e.code)}")
        except Exception as e:  # keep going: down must remove everything it can
            problems.append(f"{op} {item.get('name') or item.get('dev')}: {e}")
    return problems


def up(lab: Lab, state: State, force: bool = False, progress: Callable[[str], None] = lambda s: None,
       dry_run: bool = False, run_root: Path | None = None) -> list[Action]:
    with Net() as net:
        actions = planmod.plan(lab, observe(lab, net, run_root), force=force)
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


def down(state: State, progress: Callable[[str], None] = lambda s: None) -> tuple[int, list[str]]:
    with Net() as net:
        n = len(state.created)
        problems = undo(state.created, net, progress)
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
