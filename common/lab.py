"""The lab file: a strict YAML schema, and `load_lab(path) -> Lab`.

Every problem is a `LabError` whose str() is one line naming the field (`guests[1].mac: not a MAC address: '0a:zz'`),
so the CLI can print it and exit 2 before anything is created.

    name: seed                      # default: the file's stem; keys /run/kvmnet/<name>/
    mode: netns                     # netns: build it all in namespaces; host: act on the real host
    namespaces: {host: seed-host, lan: seed-lan}
    bridges:
      - {name: br0, address: 192.168.98.100/24, stp: {enabled: false, forward_delay: 15}, ports: [eth1]}
    uplink:                         # netns mode: a veth whose far end sits in the LAN namespace
      name: eth1
      lan: {device: eth0, addresses: [192.168.98.3/24]}
    taps: [{name: vm1eth0, owner: root, multi_queue: false, vnet_hdr: true}]
    guests:
      - {name: vm1, kind: qemu, tap: vm1eth0, bridge: br0, mac: 0a:e8:4f:c5:6a:16, address: 192.168.98.11/24}
    nat: {bridge: br1, out: wan0}
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from . import yamlfile

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class LabError(ValueError):
    """A lab file problem; str() is one line: `where: what`."""


# --- field types ------------------------------------------------------------------------------------------------

def _devname(v: Any) -> str:
    # The kernel's dev_valid_name(): 1..15 bytes, not "." or "..", no '/', ':' or whitespace.
    if not isinstance(v, str):
        raise ValueError(f"not a device name: {v!r}")
    if not v or len(v.encode()) > 15:
        raise ValueError(f"device name must be 1 to 15 bytes: {v!r}")
    if v in (".", "..") or any(c in "/:" or c.isspace() for c in v):
        raise ValueError(f"device name the kernel refuses ('/', ':', whitespace, '.', '..'): {v!r}")
    if not v.isprintable():  # the kernel takes them, but they split log lines and confuse every tool
        raise ValueError(f"device name with a control character: {v!r}")
    return v


_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _mac(v: Any) -> str:
    s = str(v).lower() if isinstance(v, str) else ""
    if not _MAC.fullmatch(s):  # fullmatch: `$` would let a trailing newline through
        raise ValueError(f"not a MAC address: {v!r}")
    if s == "00:00:00:00:00:00":
        raise ValueError(f"all-zero MAC address, the kernel refuses it: {v!r}")
    if int(s[:2], 16) & 1:
        raise ValueError(f"multicast MAC address, a NIC cannot have it: {v!r}")
    return s


def _unicast(addr: Any, v: Any) -> None:
    if "%" in str(v):  # an IPv6 scope (fe80::1%eth0): netlink takes none, and the name is not the lab's to give
        raise ValueError(f"an address with a scope (%...) is not for a lab file: {v!r}")
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError(f"not a unicast address: {v!r}")


def _iface(v: Any) -> IPInterface:
    if not isinstance(v, str):
        raise ValueError(f"not an address with prefix length (like 10.0.0.2/24): {v!r}")
    try:
        addr = ipaddress.ip_interface(v)
    except ValueError:
        raise ValueError(f"not an address with prefix length (like 10.0.0.2/24): {v!r}") from None
    if "/" not in str(v):
        raise ValueError(f"address needs a prefix length (like {v}/24): {v!r}")
    _unicast(addr.ip, v)
    return addr


def _addr(v: Any) -> IPAddress:
    if not isinstance(v, str):
        raise ValueError(f"not an IP address: {v!r}")
    try:
        addr = ipaddress.ip_address(v)
    except ValueError:
        raise ValueError(f"not an IP address: {v!r}") from None
    _unicast(addr, v)
    return addr


def _nsname(v: Any) -> str:
    # fullmatch: with re.match and `$`, "lab\n" passed and made a namespace with a newline in its name.
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
        raise ValueError(f"not a valid name (1-64 letters, digits, '_', '.', '-'): {v!r}")
    return v


MEMORY_MIB = (16, 1 << 20)  # QEMU's -m: a guest below 16 MiB does not boot; above 1 TiB is a typo


def _memory(v: Any) -> str:
    s = str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else ""
    m = re.fullmatch(r"([1-9][0-9]{0,9})([MG]?)", s)
    if not m:
        raise ValueError(f"not a memory size (like 512M or 1G): {v!r}")
    mib = int(m.group(1)) * (1024 if m.group(2) == "G" else 1)
    if not MEMORY_MIB[0] <= mib <= MEMORY_MIB[1]:
        raise ValueError(f"memory must be 16M to 1024G: {v!r}")
    return s


UID_MAX = 2**32 - 2  # uid_t/gid_t; (uid_t)-1 means "none" to the kernel


def _account(kind: str) -> Callable[[Any], Any]:
    """owner/group: a name or a number that exists on this host (a typo would make a tap nobody can open)."""
    import grp
    import pwd
    by_name, by_id = (pwd.getpwnam, pwd.getpwuid) if kind == "user" else (grp.getgrnam, grp.getgrgid)

    def check(v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"not a {kind} name or number: {v!r}")
        if isinstance(v, int) and not 0 <= v <= UID_MAX:
            raise ValueError(f"{kind} id must be 0 to {UID_MAX}: {v!r}")
        try:
            if isinstance(v, int):
                by_id(v)
            else:
                by_name(v)
        except (KeyError, ValueError, OverflowError):
            raise ValueError(f"no such {kind}: {v!r}") from None
        return v
    return check


def _image(v: Any) -> Any:
    if v is not None and (not isinstance(v, str) or not v.isprintable() or len(v) > 4096):
        raise ValueError(f"not a file name: {v!r}")
    return v


DevName = Annotated[str, BeforeValidator(_devname)]
Mac = Annotated[str, BeforeValidator(_mac)]
Interface = Annotated[Any, BeforeValidator(_iface)]
Address = Annotated[Any, BeforeValidator(_addr)]
NsName = Annotated[str, BeforeValidator(_nsname)]
Memory = Annotated[str, BeforeValidator(_memory)]
Owner = Annotated[str | int | None, BeforeValidator(_account("user"))]
Group = Annotated[str | int | None, BeforeValidator(_account("group"))]
Image = Annotated[str | None, BeforeValidator(_image)]

# Bounds on counts: a bridge takes at most 1023 ports (the kernel's BR_MAX_PORTS, port 0 reserved); the others keep
# a lab file something `up` finishes in minutes.
MAX_BRIDGES, MAX_TAPS, MAX_GUESTS, MAX_PORTS = 256, 4096, 4096, 1023


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# --- the schema -------------------------------------------------------------------------------------------------

class Stp(_Strict):
    """Spanning tree; timers in seconds as the kernel's bridge options take them (forward_delay 2..30)."""
    enabled: bool = False
    forward_delay: float = Field(15.0, ge=2, le=30)
    hello_time: float = Field(2.0, ge=1, le=10)
    max_age: float = Field(20.0, ge=6, le=40)
    priority: int = Field(32768, ge=0, le=65535)


def _stp(v: Any) -> Any:
    return {"enabled": v} if isinstance(v, bool) else v


class Bridge(_Strict):
    name: DevName
    address: Interface | None = None
    stp: Annotated[Stp, BeforeValidator(_stp)] = Stp()
    ports: list[DevName] = Field([], max_length=MAX_PORTS)
    # The kernel's FDB learning limit (IFLA_BR_FDB_MAX_LEARNED, 6.8+): past it new MACs are not learned (and flood).
    # 0 = no limit; unset = leave the kernel's value. Bounded at 2^20, far past what a bridge should learn.
    fdb_max_learned: int | None = Field(None, ge=0, le=1 << 20)


class Lan(_Strict):
    """The far end of the uplink (netns mode): the LAN (or WAN) namespace's device and its peers' addresses."""
    device: DevName = "eth0"
    addresses: list[Interface] = Field([], max_length=256)


class Uplink(_Strict):
    name: DevName
    # What the uplink carries before `up` (netns mode simulates a host's eth1 with these); enslaving the uplink moves
    # its addresses to the bridge, as the seed's `ip addr flush dev eth1; ip addr add ... dev br0`.
    address: Interface | None = None
    gateway: Address | None = None
    lan: Lan | None = None


class Tap(_Strict):
    name: DevName
    owner: Owner = None
    group: Group = None
    multi_queue: bool = False
    vnet_hdr: bool = True
    bridge: DevName | None = None


class Guest(_Strict):
    name: NsName                     # also names its QEMU (-name) and, for netns guests, its namespace
    kind: Literal["qemu", "netns"] = "qemu"
    tap: DevName                     # the bridge port: a tap for qemu, the host-side veth for netns guests
    bridge: DevName
    mac: Mac | None = None           # default: derived from lab and guest name (stable, locally administered)
    address: Interface
    gateway: Address | None = None
    netns: NsName | None = None      # netns guests: their namespace (default <host namespace>-<name>)
    memory: Memory = "128M"
    cpus: int = Field(1, ge=1, le=64)
    image: Image = None         # None/"default": the built-in tiny guest; else a disk image path
    accel: Literal["auto", "kvm", "tcg"] = "auto"

    @property
    def device(self) -> str:
        return self.tap


class Nat(_Strict):
    bridge: DevName
    out: DevName                     # the routed uplink the bridge's traffic is masqueraded out of


class Namespaces(_Strict):
    host: NsName
    lan: NsName | None = None


class Lab(_Strict):
    name: NsName
    mode: Literal["netns", "host"] = "netns"
    namespaces: Namespaces | None = None
    bridges: list[Bridge] = Field([], max_length=MAX_BRIDGES)
    uplink: Uplink | None = None
    taps: list[Tap] = Field([], max_length=MAX_TAPS)
    guests: list[Guest] = Field([], max_length=MAX_GUESTS)
    nat: Nat | None = None
    # Not from the file: where it was read, so relative image paths resolve next to it.
    source: Path | None = Field(None, exclude=True)

    @property
    def host_netns(self) -> str:
        return self.namespaces.host if self.mode == "netns" and self.namespaces else ""

    @property
    def lan_netns(self) -> str:
        return self.namespaces.lan or "" if self.mode == "netns" and self.namespaces else ""

    def guest_netns(self, g: Guest) -> str:
        return g.netns or f"{self.host_netns or 'kvmnet-' + self.name}-{g.name}"

    def port_bridges(self) -> dict[str, str]:
        """Every bridge port -> its bridge (bridges[].ports, taps[].bridge, guests[].bridge)."""
        out: dict[str, str] = {}
        for b in self.bridges:
            for p in b.ports:
                out[p] = b.name
        for t in self.taps:
            if t.bridge:
                out[t.name] = t.bridge
        for g in self.guests:
            out[g.tap] = g.bridge
        return out

    def tap(self, name: str) -> Tap:
        """The tap's settings: from taps[], or the defaults for a tap only a guest names."""
        for t in self.taps:
            if t.name == name:
                return t
        return Tap(name=name)


# --- loading ----------------------------------------------------------------------------------------------------

def _fail(where: str, what: str) -> LabError:
    return LabError(f"{where}: {what}")


def parse_lab(data: Any, name: str = "lab", source: Path | None = None) -> Lab:
    """Validate an already-parsed YAML document."""
    if not isinstance(data, dict):
        raise _fail("(top level)", "the lab file must be a mapping of keys")
    data = dict(data)
    data.setdefault("name", name)
    try:
        lab = Lab.model_validate(data)
    except ValidationError as e:
        raise LabError(yamlfile.describe(e)) from None
    lab.source = source
    _check(lab)
    return lab


def load_lab(path: str | Path) -> Lab:
    """Read and validate a lab file; every problem is one line naming the file and the field."""
    path = Path(path)
    data = yamlfile.read_yaml(path, LabError)
    try:
        return parse_lab(data, name=path.stem, source=path)
    except LabError as e:
        raise LabError(f"{path}: {e}") from None


def default_mac(lab: str, guest: str) -> str:
    """A stable locally administered unicast MAC (0a:...), so relabelling a guest keeps its MAC."""
    h = hashlib.sha1(f"{lab}/{guest}".encode()).digest()
    return "0a:" + ":".join(f"{b:02x}" for b in h[:5])


def resolve_image(lab: Lab, g: Guest) -> Path | None:
    if g.image in (None, "", "default"):
        return None
    p = Path(g.image).expanduser()
    if not p.is_absolute() and lab.source is not None:
        p = lab.source.parent / p
    return p


def _check(lab: Lab) -> None:
    """Cross-field rules pydantic cannot see field by field."""
    if lab.mode == "netns" and lab.namespaces is None:
        raise _fail("namespaces", "required in netns mode (namespaces: {host: NAME, lan: NAME})")
    if lab.mode == "host":
        if lab.namespaces is not None:
            raise _fail("namespaces", "only for mode: netns (host mode acts on the real host)")
        if lab.uplink and lab.uplink.lan:
            raise _fail("uplink.lan", "only for mode: netns (on a real host the LAN is real)")
    if lab.namespaces and lab.namespaces.lan == lab.namespaces.host:
        raise _fail("namespaces.lan", f"same as namespaces.host: {lab.namespaces.host!r}")
    if lab.mode == "netns" and lab.uplink and not lab.uplink.lan:
        # Its far end needs a home: without one it would land in the root namespace.
        raise _fail("uplink.lan", "required in netns mode (the far end of the uplink, e.g. lan: {addresses: []})")
    if lab.uplink and lab.uplink.lan and not lab.lan_netns:
        raise _fail("namespaces.lan", "required when uplink.lan is given")

    bridges = {}
    for i, b in enumerate(lab.bridges):
        if b.name in bridges:
            raise _fail(f"bridges[{i}].name", f"duplicate bridge name: {b.name!r}")
        bridges[b.name] = b

    # Device names share one namespace: bridges, uplink, taps, guest ports.
    devices: dict[str, str] = {}

    def claim(name: str, where: str) -> None:
        if name in devices:
            raise _fail(where, f"duplicate device name: {name!r} (also {devices[name]})")
        devices[name] = where

    for i, b in enumerate(lab.bridges):
        claim(b.name, f"bridges[{i}].name")
    if lab.uplink:
        claim(lab.uplink.name, "uplink.name")
    taps = {}
    for i, t in enumerate(lab.taps):
        claim(t.name, f"taps[{i}].name")
        taps[t.name] = t
        if t.bridge and t.bridge not in bridges:
            raise _fail(f"taps[{i}].bridge", f"no such bridge: {t.bridge!r}")

    port_owner: dict[str, str] = {}
    for i, b in enumerate(lab.bridges):
        for j, p in enumerate(b.ports):
            where = f"bridges[{i}].ports[{j}]"
            if p in port_owner:
                raise _fail(where, f"{p!r} is already a port of {port_owner[p]!r}")
            if p in bridges:
                raise _fail(where, f"a bridge cannot be a port: {p!r}")
            if p not in devices and not (lab.mode == "host"):
                raise _fail(where, f"no such device in the lab (uplink or taps): {p!r}")
            port_owner[p] = b.name
    for i, t in enumerate(lab.taps):
        if t.bridge:
            if t.name in port_owner and port_owner[t.name] != t.bridge:
                raise _fail(f"taps[{i}].bridge", f"{t.name!r} is a port of {port_owner[t.name]!r}")
            port_owner[t.name] = t.bridge

    names: dict[str, int] = {}
    macs: dict[str, str] = {}
    addrs: dict[Any, str] = {}
    for b_i, b in enumerate(lab.bridges):
        if b.address:
            addrs[b.address.ip] = f"bridges[{b_i}].address"
    if lab.uplink and lab.uplink.lan:
        for j, a in enumerate(lab.uplink.lan.addresses):
            if a.ip in addrs:
                raise _fail(f"uplink.lan.addresses[{j}]", f"duplicate address: {a.ip} (also {addrs[a.ip]})")
            addrs[a.ip] = f"uplink.lan.addresses[{j}]"
    guest_ns: dict[str, str] = {}
    for i, g in enumerate(lab.guests):
        at = f"guests[{i}]"
        if g.name in names:
            raise _fail(f"{at}.name", f"duplicate guest name: {g.name!r}")
        names[g.name] = i
        if g.bridge not in bridges:
            raise _fail(f"{at}.bridge", f"no such bridge: {g.bridge!r}")
        if g.kind == "qemu":
            if g.tap in devices and g.tap not in taps:
                raise _fail(f"{at}.tap", f"{g.tap!r} is not a tap (also {devices[g.tap]})")
            if g.tap not in taps:
                claim(g.tap, f"{at}.tap")
            if g.netns:
                raise _fail(f"{at}.netns", "only for kind: netns")
        else:
            claim(g.tap, f"{at}.tap")
            ns = lab.guest_netns(g)
            if ns in guest_ns or ns in (lab.host_netns, lab.lan_netns):
                raise _fail(f"{at}.netns", f"duplicate namespace name: {ns!r}")
            guest_ns[ns] = at
        if g.tap in port_owner and port_owner[g.tap] != g.bridge:
            raise _fail(f"{at}.bridge", f"tap {g.tap!r} is a port of {port_owner[g.tap]!r}, not {g.bridge!r}")
        port_owner[g.tap] = g.bridge
        if g.mac is None:
            g.mac = default_mac(lab.name, g.name)
        if g.mac in macs:
            raise _fail(f"{at}.mac", f"duplicate MAC address: {g.mac} (also {macs[g.mac]})")
        macs[g.mac] = f"{at}.mac"
        if g.address.ip in addrs:
            raise _fail(f"{at}.address", f"duplicate address: {g.address.ip} (also {addrs[g.address.ip]})")
        addrs[g.address.ip] = f"{at}.address"
        br = bridges[g.bridge]
        if br.address is not None and g.address.ip not in br.address.network:
            raise _fail(f"{at}.address", f"{g.address} is outside bridge {br.name}'s subnet {br.address.network}")
        if g.gateway is not None and g.gateway not in g.address.network:
            raise _fail(f"{at}.gateway", f"{g.gateway} is outside the guest's subnet {g.address.network}")
        if g.kind == "qemu":
            img = resolve_image(lab, g)
            if img is not None and not img.is_file():
                raise _fail(f"{at}.image", f"no such image file: {str(img)!r}")
        elif g.image or g.accel != "auto":
            raise _fail(f"{at}.{'image' if g.image else 'accel'}", "only for kind: qemu")

    per_bridge: dict[str, int] = {}
    for br_name in port_owner.values():
        per_bridge[br_name] = per_bridge.get(br_name, 0) + 1
        if per_bridge[br_name] > MAX_PORTS:
            raise _fail(f"bridges[{list(bridges).index(br_name)}]",
                        f"more than {MAX_PORTS} ports on {br_name!r} (the kernel's limit per bridge)")
    import os
    run_dir = Path(os.environ.get("KVMNET_RUN_DIR", "/run/kvmnet"))  # kvmnet.setup.state.RUN_DIR (setup imports us)
    for i, g in enumerate(lab.guests):
        # QEMU's QMP socket lives at RUN_DIR/<lab>/guests/<guest>.qmp; sun_path holds 107 bytes.
        qmp = run_dir / lab.name / "guests" / f"{g.name}.qmp"
        if g.kind == "qemu" and len(str(qmp).encode()) > 107:
            raise _fail(f"guests[{i}].name", f"lab and guest names too long together: {str(qmp)!r} is more than "
                        "107 bytes, the limit of a UNIX socket path")

    if lab.uplink:
        up = lab.uplink
        if up.gateway is not None and (up.address is None or up.gateway not in up.address.network):
            raise _fail("uplink.gateway", "needs uplink.address in the same subnet")
        if lab.mode == "host" and (up.address or up.gateway):
            raise _fail("uplink.address" if up.address else "uplink.gateway",
                        "only for mode: netns (a real host's uplink already has its addresses)")
    if lab.nat:
        if lab.nat.bridge not in bridges:
            raise _fail("nat.bridge", f"no such bridge: {lab.nat.bridge!r}")
        if not lab.uplink or lab.nat.out != lab.uplink.name:
            raise _fail("nat.out", f"must name the uplink: {lab.nat.out!r}")
        if lab.nat.out in port_owner:
            raise _fail("nat.out", f"{lab.nat.out!r} is enslaved to {port_owner[lab.nat.out]!r}; NAT routes it")
        if bridges[lab.nat.bridge].address is None:
            raise _fail(f"bridges[{list(bridges).index(lab.nat.bridge)}].address", "a NAT bridge needs an address")
