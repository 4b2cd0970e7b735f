"""THE rtnetlink codec of kvmnet: constants, message header and attribute packing/iteration, shared by the exporter's
hot path (exporter/sources/netlink.py decodes its specific messages with these) and by setup; and `Rtnl`, a minimal
request socket for the bulk path of `up`: set a link's master/up, add an address, create a light guest's veth.
pyroute2 does everything else in setup (observing, bridges, routes).

Why not pyroute2 here: a request through its asyncio core costs ~0.8 ms of Python (encode, event loop, decode of
the ACK); a light guest needs four requests and a 300-port lab ~600, which alone would put `up` over twice
`ip -batch`. Packing the few message shapes with struct costs ~20 us each. Layouts are <linux/netlink.h>,
<linux/rtnetlink.h>, <linux/if_link.h>, <linux/neighbour.h> and <linux/veth.h>:
https://github.com/torvalds/linux/blob/master/include/uapi/linux/{netlink,rtnetlink,if_link,neighbour,veth}.h
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

from kvmnet.common.netns import entered

# <linux/netlink.h>
NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP_INTR = 0x1, 0x2, 0x4, 0x10
NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x200, 0x400, 0x300
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER
# <linux/rtnetlink.h>
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_NEWSTATS, RTM_GETSTATS = 92, 94
RTNLGRP_LINK, RTNLGRP_NEIGH = 1, 3
RTEXT_FILTER_SKIP_STATS = 1 << 3
# <linux/if_link.h>
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_PROTINFO, IFLA_LINKINFO = 1, 3, 5, 10, 12, 18
IFLA_NET_NS_FD, IFLA_EXT_MASK, IFLA_CARRIER_CHANGES = 28, 29, 35
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
IFLA_TXQLEN = 13
IFLA_BR_STP_STATE = 5
IFLA_BR_ROOT_ID, IFLA_BR_BRIDGE_ID, IFLA_BR_ROOT_PORT, IFLA_BR_ROOT_PATH_COST = 10, 11, 12, 13
IFLA_BR_TOPOLOGY_CHANGE, IFLA_BR_TOPOLOGY_CHANGE_DETECTED = 14, 15
# Kernel 6.8+ (after IFLA_BR_MCAST_QUERIER_STATE = 47; Debian's 6.1 headers stop there). Checked by behaviour on
# this 6.18 kernel: setting 49 to N makes the bridge stop learning after N MACs and 48 counts them
# (tests/netns/test_bridge_internals.py).
IFLA_BR_FDB_N_LEARNED, IFLA_BR_FDB_MAX_LEARNED = 48, 49
IFLA_BRPORT_STATE = 1
IFLA_TUN_TYPE = 3
IFLA_STATS_LINK_64, IFLA_STATS_LINK_XSTATS_SLAVE = 1, 3
LINK_XSTATS_TYPE_BRIDGE = 1
BRIDGE_XSTATS_STP = 4  # <linux/if_bridge.h>: struct bridge_stp_xstats, six __u64
# <linux/rtnetlink.h>, <linux/pkt_sched.h>, <linux/gen_stats.h>
RTM_NEWQDISC, RTM_GETQDISC = 36, 38
TCA_KIND, TCA_STATS2 = 1, 7
TCA_STATS_BASIC, TCA_STATS_QUEUE, TCA_STATS_PKT64 = 1, 3, 8
TC_H_ROOT = 0xFFFFFFFF
VETH_INFO_PEER = 1  # <linux/veth.h>
IFA_ADDRESS, IFA_LOCAL = 1, 2  # <linux/if_addr.h>
# <linux/if.h>
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000
# <linux/neighbour.h>
NDA_DST, NDA_LLADDR, NDA_VLAN, NDA_MASTER = 1, 2, 5, 9
NUD_INCOMPLETE, NUD_FAILED, NUD_NOARP, NUD_PERMANENT = 0x01, 0x20, 0x40, 0x80

HDR = struct.Struct("=IHHII")   # nlmsghdr
NLA = struct.Struct("=HH")      # nlattr
IFI = struct.Struct("=BxHiII")  # ifinfomsg


# ---------------------------------------------------------------------------------------------------------------
# Messages and attributes. Hot path: the exporter decodes every scrape's dumps through these two loops.

def iter_messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, offset, end) of each netlink message in a receive buffer."""
    off, n = 0, len(data)
    unpack = HDR.unpack_from
    while off + 16 <= n:
        length, typ, flags, seq, _pid = unpack(data, off)
        if length < 16 or off + length > n:
            break
        yield typ, flags, seq, off, off + length
        off += (length + 3) & ~3


def attr_spans(data: bytes, off: int, end: int, strict: bool = False) -> dict[int, tuple[int, int]]:
    """Attributes between off and end as {type: (payload_start, payload_end)}: no copies. An attribute whose
    length is below 4 or runs past `end` ends the walk; with `strict` it raises ValueError instead (the exporter
    must not silently lose a device's name or master to a truncated message)."""
    out = {}
    unpack = NLA.unpack_from
    while off + 4 <= end:
        alen, atype = unpack(data, off)
        if alen < 4 or off + alen > end:
            if strict:
                raise ValueError(f"attribute {atype & NLA_TYPE_MASK} of {alen} bytes at {off} runs past its "
                                 f"message (ends at {end})")
            break
        out[atype & NLA_TYPE_MASK] = (off + 4, off + alen)
        off += (alen + 3) & ~3
    return out


def attrs(data: bytes, off: int = 0) -> dict[int, bytes]:
    """Attributes from off to the end of data as {type: payload bytes} (the convenient, copying form)."""
    return {k: data[s:e] for k, (s, e) in attr_spans(data, off, len(data)).items()}


def pack_attr(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return NLA.pack(n, kind) + data + b"\0" * ((4 - n % 4) % 4)


def pack_message(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    return HDR.pack(16 + len(body), msg_type, flags, seq, 0) + body


def error_code(data: bytes, off: int) -> int:
    """The errno of an NLMSG_ERROR message at off (0 = an ACK)."""
    code: int = struct.unpack_from("=i", data, off + 16)[0]
    return -code


# ---------------------------------------------------------------------------------------------------------------
# Setup's request socket.

_attr = pack_attr


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return IFI.pack(socket.AF_UNSPEC, 0, index, flags, change)


def _name(name: str) -> bytes:
    return _attr(IFLA_IFNAME, name.encode() + b"\0")


def _mac(mac: str) -> bytes:
    return _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))


class NetlinkError(OSError):
    pass


class Rtnl:
    """One NETLINK_ROUTE socket, made inside namespace `ns` ("" = our own), used until close()."""

    def __init__(self, ns: str = ""):
        with entered(ns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, msg_type: int, flags: int, body: bytes) -> None:
        """Send one request and wait for its ACK; a kernel error raises NetlinkError(errno)."""
        self.seq += 1
        self.sock.send(pack_message(msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, body))
        while True:
            data = self.sock.recv(65536)
            for kind, _, seq, off, _ in iter_messages(data):
                if kind == NLMSG_ERROR and seq == self.seq:
                    code = error_code(data, off)
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return

    def _dump(self, msg_type: int, body: bytes) -> Iterator[tuple[int, bytes]]:
        """Yield (type, payload) of every message in a dump."""
        self.seq += 1
        self.sock.send(pack_message(msg_type, NLM_F_REQUEST | NLM_F_DUMP, self.seq, body))
        while True:
            data = self.sock.recv(1 << 20)
            for kind, _, seq, off, end in iter_messages(data):
                if seq == self.seq:
                    if kind == NLMSG_DONE:
                        return
                    if kind == NLMSG_ERROR:
                        code = error_code(data, off)
                        raise NetlinkError(code, os.strerror(code))
                    yield kind, data[off + 16:end]

    _attrs = staticmethod(attrs)

    def links(self) -> dict[str, tuple[int, int]]:
        """name -> (ifindex, flags)."""
        out = {}
        for _, p in self._dump(RTM_GETLINK, _ifinfo()):
            _, _, index, flags, _ = struct.unpack_from("BxHiII", p)
            name = self._attrs(p, 16).get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
            out[name] = (index, flags)
        return out

    def link_details(self) -> list[dict[str, Any]]:
        """Per link: index, name, flags, master (index or 0), kind, and for a bridge its STP options."""
        out = []
        for _, p in self._dump(RTM_GETLINK, _ifinfo()):
            _, _, index, flags, _ = struct.unpack_from("BxHiII", p)
            a = self._attrs(p, 16)
            info = self._attrs(a.get(IFLA_LINKINFO, b""), 0)
            kind = info.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode()
            bridge = None
            if kind == "bridge":
                d = self._attrs(info.get(IFLA_INFO_DATA, b""), 0)

                def u32(k: int, d: dict[int, bytes] = d) -> int | None:
                    return struct.unpack("I", d[k])[0] if k in d else None
                bridge = {"forward_delay": u32(1), "hello_time": u32(2), "max_age": u32(3), "stp_state": u32(5),
                          "priority": struct.unpack("H", d[6])[0] if 6 in d else None,  # IFLA_BR_* of if_link.h
                          "fdb_max_learned": u32(IFLA_BR_FDB_MAX_LEARNED)}  # None before kernel 6.8
            out.append({"index": index, "flags": flags, "kind": kind, "bridge": bridge,
                        "name": a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"),
                        "master": struct.unpack("I", a[IFLA_MASTER])[0] if IFLA_MASTER in a else 0})
        return out

    def addresses(self) -> list[tuple[int, str]]:
        """(ifindex, "ip/prefixlen") for every address."""
        out = []
        for _, p in self._dump(RTM_GETADDR, struct.pack("BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0)):
            fam, plen, _, _, index = struct.unpack_from("BBBBI", p)
            a = self._attrs(p, 8)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if raw:
                out.append((index, f"{ipaddress.ip_address(raw)}/{plen}"))
        return out

    def link_set(self, name: str, master: int | None = None, up: bool | None = None) -> None:
        # ifi_index 0 + IFLA_IFNAME: the kernel finds the device by name, no index lookup round trip.
        flags, change = (IFF_UP if up else 0), (IFF_UP if up is not None else 0)
        body = _ifinfo(0, flags, change) + _name(name)
        if master is not None:
            body += _attr(IFLA_MASTER, struct.pack("I", master))
        self.request(RTM_NEWLINK, 0, body)

    def bridge_fdb_max_learned(self, index: int, limit: int) -> None:
        """Set IFLA_BR_FDB_MAX_LEARNED (neither iproute2 6.1 nor pyroute2 knows it)."""
        data = _attr(IFLA_BR_FDB_MAX_LEARNED, struct.pack("I", limit))
        info = _attr(IFLA_INFO_KIND, b"bridge\0") + _attr(IFLA_INFO_DATA | NLA_F_NESTED, data)
        self.request(RTM_NEWLINK, 0, _ifinfo(index) + _attr(IFLA_LINKINFO | NLA_F_NESTED, info))

    def link_up_index(self, index: int) -> None:
        self.request(RTM_NEWLINK, 0, _ifinfo(index, IFF_UP, IFF_UP))

    def addr_add(self, index: int, address: str) -> None:
        iface = ipaddress.ip_interface(address)
        fam = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        raw = iface.ip.packed
        body = struct.pack("BBBBI", fam, iface.network.prefixlen, 0, 0, index)
        body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        try:
            self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)
        except NetlinkError as e:
            if e.errno != errno.EEXIST:
                raise

    def veth_add(self, name: str, index: int, mac: str | None, peer: str, peer_ns_fd: int, up: bool = True,
                 peer_index: int = 0) -> None:
        """Create veth `name` (at ifindex `index`, with `mac`, up) here, and its peer in namespace `peer_ns_fd` (at
        `peer_index`, or where the kernel puts it)."""
        peer_msg = _ifinfo(peer_index) + _name(peer) + _attr(IFLA_NET_NS_FD, struct.pack("I", peer_ns_fd))
        data = _attr(VETH_INFO_PEER | NLA_F_NESTED, peer_msg)
        info = _attr(IFLA_INFO_KIND, b"veth\0") + _attr(IFLA_INFO_DATA | NLA_F_NESTED, data)
        body = _ifinfo(index, IFF_UP if up else 0, IFF_UP if up else 0) + _name(name)
        if mac:
            body += _mac(mac)
        body += _attr(IFLA_LINKINFO | NLA_F_NESTED, info)
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)
