"""A minimal rtnetlink request socket for the bulk path of `up`: set a link's master/up, add an address, create a
light guest's veth. pyroute2 does everything else (observing, bridges, routes).

Why not pyroute2 here: a request through its asyncio core costs ~0.8 ms of Python (encode, event loop, decode of
the ACK); a light guest needs four requests and a 300-port lab ~600, which alone would put `up` over twice
`ip -batch`. Packing the few message shapes with struct costs ~20 us each. Layouts are <linux/netlink.h>,
<linux/rtnetlink.h>, <linux/if_link.h> and <linux/veth.h>.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from kvmnet.exporter.sources.netns import entered

NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE, NLM_F_DUMP = 2, 3, 0x300
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 10, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFLA_BR_FDB_MAX_LEARNED = 49  # kernel 6.8+, after IFLA_BR_FDB_N_LEARNED = 48
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFF_UP = 1
NLA_F_NESTED = 0x8000


def _attr(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return struct.pack("HH", n, kind) + data + b"\0" * ((4 - n % 4) % 4)


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


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
        self.sock.send(struct.pack("IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0)
                       + body)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, kind, _, seq, _ = struct.unpack_from("IHHII", data, off)
                if kind == NLMSG_ERROR and seq == self.seq:
                    code = -struct.unpack_from("i", data, off + 16)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return
                off += (length + 3) & ~3

    def _dump(self, msg_type: int, body: bytes):
        """Yield (type, payload) of every message in a dump."""
        self.seq += 1
        self.sock.send(struct.pack("IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0) + body)
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, kind, _, seq, _ = struct.unpack_from("IHHII", data, off)
                if seq == self.seq:
                    if kind == NLMSG_DONE:
                        return
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("i", data, off + 16)[0]
                        raise NetlinkError(code, os.strerror(code))
                    yield kind, data[off + 16:off + length]
                off += (length + 3) & ~3

    @staticmethod
    def _attrs(data: bytes, off: int) -> dict[int, bytes]:
        out = {}
        while off + 4 <= len(data):
            n, kind = struct.unpack_from("HH", data, off)
            if n < 4:
                break
            out[kind & 0x3FFF] = data[off + 4:off + n]
            off += (n + 3) & ~3
        return out

    def links(self) -> dict[str, tuple[int, int]]:
        """name -> (ifindex, flags)."""
        out = {}
        for _, p in self._dump(RTM_GETLINK, _ifinfo()):
            _, _, index, flags, _ = struct.unpack_from("BxHiII", p)
            name = self._attrs(p, 16).get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
            out[name] = (index, flags)
        return out

    def link_details(self) -> list[dict]:
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
                u32 = lambda k: struct.unpack("I", d[k])[0] if k in d else None  # noqa: E731
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

    def veth_add(self, name: str, index: int, mac: str | None, peer: str, peer_ns_fd: int, up: bool = True) -> None:
        """Create veth `name` (at ifindex `index`, with `mac`, up) here, and its peer in namespace `peer_ns_fd`."""
        peer_msg = _ifinfo() + _name(peer) + _attr(IFLA_NET_NS_FD, struct.pack("I", peer_ns_fd))
        data = _attr(VETH_INFO_PEER | NLA_F_NESTED, peer_msg)
        info = _attr(IFLA_INFO_KIND, b"veth\0") + _attr(IFLA_INFO_DATA | NLA_F_NESTED, data)
        body = _ifinfo(index, IFF_UP if up else 0, IFF_UP if up else 0) + _name(name)
        if mac:
            body += _mac(mac)
        body += _attr(IFLA_LINKINFO | NLA_F_NESTED, info)
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)
