"""Desired (the lab) vs observed (the kernel) -> the actions that make them equal. Pure: no I/O here, so plans are
unit-tested with hand-made observations; `apply.observe()` gathers the real one.

Order matters and is fixed: namespaces, bridges, uplink (and the seed's address move), taps, light guests, NAT, and
QEMU guests last, because they are the slowest and the likeliest to fail (a failure rolls back the rest).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from kvmnet.common.lab import Lab

LIGHT_DEV = "eth0"  # a light guest's own end of its veth, inside its namespace
NAT_TABLE = "kvmnet"


@dataclass
class Link:
    name: str
    kind: str = ""                  # IFLA_INFO_KIND: bridge, veth, tun, "" for physical
    master: str | None = None
    up: bool = False
    addresses: list[str] = field(default_factory=list)  # "ip/prefix", link-local IPv6 left out
    bridge: dict | None = None      # bridge options in kernel units: stp_state, forward_delay (cs), ...


@dataclass
class Observed:
    namespaces: set[str] = field(default_factory=set)               # named namespaces that exist
    links: dict[str, dict[str, Link]] = field(default_factory=dict)  # netns ("" = host) -> name -> link
    default_dev: dict[str, str | None] = field(default_factory=dict)  # netns -> device of the default route
    default_gw: dict[str, str | None] = field(default_factory=dict)   # netns -> its gateway
    light_ok: set[str] = field(default_factory=set)   # light guests whose namespace, veth and address are all there
    qemu_alive: set[str] = field(default_factory=set)  # QEMU guests whose process runs
    nat: set[str] = field(default_factory=set)        # namespaces holding an nft table named NAT_TABLE
    # Ownership, from the record's identities (apply._ownership): what exists and is ours. What exists and is not
    # ours is never used, changed or removed: `up` refuses when a name it would create is taken.
    ours_ns: set[str] = field(default_factory=set)
    ours_links: dict[str, set[str]] = field(default_factory=dict)   # netns -> device names
    ours_nat: set[str] = field(default_factory=set)
    not_namespaces: set[str] = field(default_factory=set)  # /run/netns entries that are plain files (half-made)


@dataclass
class Action:
    op: str
    ns: str
    name: str
    args: dict = field(default_factory=dict)

    def __str__(self) -> str:
        where = f" in {self.ns}" if self.ns else ""
        a = self.args
        text = {
            "netns_add": f"create namespace {self.name}",
            "bridge_add": f"create bridge {self.name}{where} "
                          f"(stp {'on' if a.get('stp', {}).get('enabled') else 'off'})",
            "bridge_set": f"set bridge {self.name}{where} options {a.get('stp')}"
                          + (f" fdb_max_learned {a['fdb_max_learned']}" if "fdb_max_learned" in a else ""),
            "veth_add": f"create veth {self.name}{where} <-> {a.get('peer')} in {a.get('peer_ns') or 'host'}",
            "tap_add": f"create tap {self.name}{where}" + "".join(
                f" {k}={a[k]}" for k in ("owner", "multi_queue", "vnet_hdr") if a.get(k) not in (None, False)),
            "addr_add": f"add address {a.get('address')} to {self.name}{where}",
            "addr_flush": f"move addresses off {self.name}{where}: flush {', '.join(a.get('addresses', []))}",
            "route_add": f"add default route via {a.get('gateway')} dev {self.name}{where}",
            "master": f"enslave {self.name} to {a.get('bridge')}{where}",
            "up": f"set {self.name} up{where}",
            "light_del": f"remove incomplete light guest {self.name} (namespace {a.get('netns')})",
            "light_add": f"create light guest {self.name}: namespace {a.get('netns')}, veth {a.get('device')} on "
                         f"{a.get('bridge')}, {a.get('address')} mac {a.get('mac')}",
            "nat_add": f"masquerade {a.get('bridge')} out of {a.get('out')}{where} (nft table {NAT_TABLE})",
            "guest_start": f"start QEMU guest {self.name}{where} on tap {a.get('tap')}",
        }.get(self.op, f"{self.op} {self.name}{where} {a}")
        return text

    def to_json(self) -> dict:
        return {"op": self.op, "netns": self.ns, "name": self.name, **self.args, "text": str(self)}


class Refused(Exception):
    """The plan would do something harmful without --force; str() says what and why."""


def _stp_kernel(stp) -> dict:
    # The kernel keeps bridge timers in centiseconds (USER_HZ), `ip -d link` shows them that way.
    return {"stp_state": 1 if stp.enabled else 0, "forward_delay": round(stp.forward_delay * 100),
            "hello_time": round(stp.hello_time * 100), "max_age": round(stp.max_age * 100),
            "priority": stp.priority}


_NOT_OURS = "kvmnet-setup never adopts, changes or removes what it did not create: remove it or choose another name"


def plan(lab: Lab, obs: Observed, force: bool = False) -> list[Action]:
    """The actions; Refused (nothing done) if a name the lab would create is taken by something not ours."""
    acts: list[Action] = []
    host = lab.host_netns
    add = lambda op, ns, name, **args: acts.append(Action(op, ns, name, args))  # noqa: E731

    def ns_free(ns: str, where: str) -> bool:
        """True if `ns` must be created; False if it is ours already; Refused if someone else has the name."""
        if ns not in obs.namespaces:
            return True
        if ns in obs.ours_ns:
            return False
        half = " (a plain file, not a namespace: a half-made `ip netns add`?)" if ns in obs.not_namespaces else ""
        raise Refused(f"{where}: namespace {ns!r} exists{half} and was not made by lab {lab.name}; {_NOT_OURS}")

    def dev_free(ns: str, name: str, where: str) -> None:
        if name in obs.links.get(ns, {}) and name not in obs.ours_links.get(ns, set()):
            place = f"in namespace {ns}" if ns else "on this host"
            raise Refused(f"{where}: device {name!r} exists {place} and was not made by lab {lab.name}; {_NOT_OURS}")

    if lab.mode == "netns":
        for role, ns in (("host", host), ("lan", lab.lan_netns)):
            if ns and ns_free(ns, f"namespaces.{role}"):
                add("netns_add", "", ns)
    links = obs.links.get(host, {})
    lan_links = obs.links.get(lab.lan_netns, {})

    for i, b in enumerate(lab.bridges):
        dev_free(host, b.name, f"bridges[{i}].name")
        have = links.get(b.name)
        want = _stp_kernel(b.stp)
        limit = {} if b.fdb_max_learned is None else {"fdb_max_learned": b.fdb_max_learned}
        want.update(limit)
        if have is None:
            add("bridge_add", host, b.name, stp=b.stp.model_dump(), **limit)
        elif have.bridge is not None and any(have.bridge.get(k) != v for k, v in want.items()):
            add("bridge_set", host, b.name, stp=b.stp.model_dump(), **limit)
        if b.address and (have is None or str(b.address) not in have.addresses):
            add("addr_add", host, b.name, address=str(b.address))
        if have is None or not have.up:
            add("up", host, b.name)

    ports = lab.port_bridges()
    up = lab.uplink
    if up:
        have = links.get(up.name)
        bridge = ports.get(up.name)
        addresses = list(have.addresses) if have else []
        default = obs.default_dev.get(host)
        if lab.mode == "netns":
            dev_free(host, up.name, "uplink.name")
            if up.lan and up.name not in links:
                dev_free(lab.lan_netns, up.lan.device, "uplink.lan.device")
        if have is None:
            if lab.mode == "host":
                raise Refused(f"uplink.name: no such device on this host: {up.name!r}")
            lan = up.lan
            add("veth_add", host, up.name, peer=lan.device if lan else f"{up.name}p", peer_ns=lab.lan_netns)
            # netns mode simulates the host before bridging: the uplink carries an address (and maybe the default
            # route), which the move below takes off it.
            if up.address:
                add("addr_add", host, up.name, address=str(up.address))
                addresses = [str(up.address)]
            add("up", host, up.name)
            if up.gateway:
                add("route_add", host, up.name, gateway=str(up.gateway))
                default = up.name
        if lab.mode == "netns" and up.lan:
            peer = lan_links.get(up.lan.device)
            for a in up.lan.addresses:
                if peer is None or str(a) not in peer.addresses:
                    add("addr_add", lab.lan_netns, up.lan.device, address=str(a))
            if peer is None or not peer.up:
                add("up", lab.lan_netns, up.lan.device)
        if bridge:
            if addresses:
                if default == up.name and not force:
                    raise Refused(
                        f"uplink.name: {up.name} carries the default route; moving its addresses "
                        f"({', '.join(addresses)}) to {bridge} would cut this host off until the route is re-added "
                        f"on {bridge}. Use --force to move the addresses and the default route together")
                gw = (up.gateway or obs.default_gw.get(host)) if default == up.name else None
                # The kernel drops the default route with the address; `down` puts both back on the uplink.
                add("addr_flush", host, up.name, addresses=addresses, gateway=str(gw) if gw else None)
                if gw:
                    add("route_add", host, bridge, gateway=str(gw))
            if have is None or have.master != bridge:
                add("master", host, up.name, bridge=bridge)
        elif have is not None and not have.up:
            add("up", host, up.name)

    qemu_taps = {g.tap for g in lab.guests if g.kind == "qemu"}
    tap_names = [t.name for t in lab.taps] + [t for t in sorted(qemu_taps) if t not in {x.name for x in lab.taps}]
    alive = {g.tap for g in lab.guests if g.kind == "qemu" and g.name in obs.qemu_alive}
    where = {t.name: f"taps[{i}].name" for i, t in enumerate(lab.taps)}
    for i, g in enumerate(lab.guests):
        where.setdefault(g.tap, f"guests[{i}].tap")
    for name in tap_names:
        dev_free(host, name, where[name])
        t = lab.tap(name)
        have = links.get(name)
        if have is None:
            add("tap_add", host, name, owner=t.owner, group=t.group, multi_queue=t.multi_queue, vnet_hdr=t.vnet_hdr)
        bridge = ports.get(name)
        # A guest's tap is enslaved by kvmnet-ifup when QEMU starts it, as in the seed; only repair it here.
        if name in qemu_taps and name not in alive:
            continue
        if bridge and (have is None or have.master != bridge):
            add("master", host, name, bridge=bridge)
        if have is None or not have.up:
            add("up", host, name)

    for i, g in enumerate(lab.guests):
        if g.kind != "netns" or g.name in obs.light_ok:
            continue
        gns = lab.guest_netns(g)
        ns_free(gns, f"guests[{i}].netns")
        dev_free(host, g.tap, f"guests[{i}].tap")
        args = dict(netns=gns, device=g.tap, bridge=g.bridge, mac=g.mac, address=str(g.address),
                    gateway=str(g.gateway) if g.gateway else None)
        if gns in obs.namespaces or g.tap in links:  # ours (checked above), but incomplete: made again
            add("light_del", host, g.name, **args)
        add("light_add", host, g.name, **args)

    if lab.nat and host in obs.nat and host not in obs.ours_nat:
        raise Refused(f"nat: nft table inet {NAT_TABLE} exists {f'in namespace {host}' if host else 'on this host'} "
                      f"and was not made by lab {lab.name}; {_NOT_OURS}")
    if lab.nat and host not in obs.nat:
        b = next(b for b in lab.bridges if b.name == lab.nat.bridge)
        add("nat_add", host, NAT_TABLE, bridge=b.name, out=lab.nat.out,
            network=str(ipaddress.ip_interface(b.address).network))

    for g in lab.guests:
        if g.kind == "qemu" and g.name not in obs.qemu_alive:
            add("guest_start", host, g.name, tap=g.tap, bridge=g.bridge, mac=g.mac, address=str(g.address))
    return acts
