"""A fake rtnetlink kernel for the unit tier: NetlinkSource's real I/O code against recorded dumps, without root.

    kernel = FakeKernel()                              # serves tests/unit/data/{links,fdb,stats,neigh,qdisc,bridges}.bin
    src = NetlinkSource("", socket_factory=kernel.factory)
    kernel.script[RTM_GETSTATS] = ["intr", "ok"]       # what the next requests of that type get
    kernel.event(events_bytes)                         # a datagram on the event socket

Each socket the source asks for is one end of an AF_UNIX SOCK_SEQPACKET socketpair, which keeps datagram
boundaries as a netlink socket does. A thread answers requests on the other end: it reads the request's type and
sequence number and sends the recorded messages of that dump, renumbered, a few per datagram (multi-part), with
NLM_F_MULTI, then NLMSG_DONE, or whatever the script says instead:

    ok          the dump as recorded
    intr        the same, with NLM_F_DUMP_INTR on its messages (the table changed during the dump)
    done_error  the messages, then an NLMSG_DONE carrying -EMSGSIZE (the kernel's way of failing a dump midway)
    error       one NLMSG_ERROR (-EOPNOTSUPP) instead of a dump
    truncated   a first datagram whose first message claims more bytes than the datagram holds
    malformed   a link message whose IFLA_MASTER has 2 bytes, then the dump
    overrun     a link message whose IFLA_IFNAME claims more bytes than the message has, then the dump
    silent      no answer (the source's timeout fires)
"""
from __future__ import annotations

import errno
import socket
import struct
import threading
from pathlib import Path

from kvmnet.common import rtnl

DATA = Path(__file__).resolve().parent / "data"
PER_DATAGRAM = 4  # messages per datagram: every recorded dump becomes several


def messages(blob: bytes) -> list[bytes]:
    """The messages of a recording, without its NLMSG_DONE / NLMSG_ERROR."""
    return [blob[off:end] for typ, _f, _s, off, end in rtnl.iter_messages(blob)
            if typ not in (rtnl.NLMSG_DONE, rtnl.NLMSG_ERROR)]


def renumber(msg: bytes, seq: int, flags: int) -> bytes:
    b = bytearray(msg)
    length, typ, old_flags, _seq, pid = rtnl.HDR.unpack_from(b, 0)
    rtnl.HDR.pack_into(b, 0, length, typ, old_flags | flags, seq, pid)
    return bytes(b) + b"\0" * ((4 - len(b) % 4) % 4)


def done(seq: int, flags: int = rtnl.NLM_F_MULTI, err: int = 0) -> bytes:
    return rtnl.HDR.pack(20, rtnl.NLMSG_DONE, flags, seq, 0) + struct.pack("=i", -err)


def error(seq: int, err: int, request: bytes) -> bytes:
    body = struct.pack("=i", -err) + request[:16]
    return rtnl.HDR.pack(16 + len(body), rtnl.NLMSG_ERROR, 0, seq, 0) + body


def malformed_link(seq: int) -> bytes:
    body = rtnl.IFI.pack(0, 1, 999, 0, 0) + rtnl.pack_attr(rtnl.IFLA_IFNAME, b"bad0\0") \
        + rtnl.NLA.pack(6, rtnl.IFLA_MASTER) + b"\x01\x00\0\0"
    return rtnl.HDR.pack(16 + len(body), rtnl.RTM_NEWLINK, rtnl.NLM_F_MULTI, seq, 0) + body


def overrun_link(seq: int) -> bytes:
    body = rtnl.IFI.pack(0, 1, 998, 0, 0) + rtnl.NLA.pack(40, rtnl.IFLA_IFNAME) + b"bad1\0\0\0\0"
    return rtnl.HDR.pack(16 + len(body), rtnl.RTM_NEWLINK, rtnl.NLM_F_MULTI, seq, 0) + body


class FakeKernel:
    def __init__(self, dumps: dict[tuple[int, int], bytes] | None = None) -> None:
        if dumps is None:
            dumps = recorded()
        self.dumps = dumps  # (request type, family) -> recorded messages
        self.script: dict[int, list[str]] = {}  # request type -> modes for its next requests; then "ok"
        self.requests: list[tuple[int, int]] = []  # (type, family) of every request served
        self.opened: list[tuple[int, ...]] = []  # the groups of every socket made (() = a request socket)
        self.events_peer: socket.socket | None = None
        self._peers: list[socket.socket] = []
        self.enobufs = 0  # the event socket's next recv()s raise ENOBUFS this many times

    # -- the factory NetlinkSource is given ------------------------------------------------------------------
    def factory(self, netns: str, groups: tuple[int, ...] = ()) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.opened.append(tuple(groups))
        self._peers.append(theirs)
        if groups:
            self.events_peer = theirs
            return _EventSocket(ours, self)
        threading.Thread(target=self._serve, args=(theirs,), daemon=True).start()
        return ours

    def event(self, blob: bytes) -> None:
        """Queue notifications on the current event socket, a few messages per datagram."""
        msgs = [renumber(m, 0, 0) for m in messages(blob)]
        for i in range(0, len(msgs), PER_DATAGRAM):
            self.events_peer.send(b"".join(msgs[i:i + PER_DATAGRAM]))

    def close(self) -> None:
        for s in self._peers:
            s.close()

    # -- the responder -----------------------------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                req = sock.recv(65536)
            except OSError:
                return
            if not req:
                return
            _len, typ, _flags, seq, _pid = rtnl.HDR.unpack_from(req, 0)
            family = req[16]
            self.requests.append((typ, family))
            modes = self.script.get(typ)
            mode = modes.pop(0) if modes else "ok"
            try:
                for datagram in self.answer(mode, typ, family, seq, req):
                    sock.send(datagram)
            except OSError:
                return

    def answer(self, mode: str, typ: int, family: int, seq: int, req: bytes) -> list[bytes]:
        if mode == "silent":
            return []
        if mode == "error":
            return [error(seq, errno.EOPNOTSUPP, req)]
        flags = rtnl.NLM_F_MULTI | (rtnl.NLM_F_DUMP_INTR if mode == "intr" else 0)
        key = (typ, family)
        if typ == rtnl.RTM_GETLINK and len(req) > 40 and (typ, family, "kind") in self.dumps:
            key = (typ, family, "kind")  # a dump filtered by IFLA_INFO_KIND (the bridges only)
        msgs = [renumber(m, seq, flags) for m in messages(self.dumps[key])]
        if mode == "malformed":
            msgs.insert(0, malformed_link(seq))
        if mode == "overrun":
            msgs.insert(0, overrun_link(seq))
        out = [b"".join(msgs[i:i + PER_DATAGRAM]) for i in range(0, len(msgs), PER_DATAGRAM)]
        out.append(done(seq, flags, errno.EMSGSIZE if mode == "done_error" else 0))
        if mode == "truncated":
            first = bytearray(out[0])
            rtnl.HDR.pack_into(first, 0, len(first) + 64, *rtnl.HDR.unpack_from(first, 0)[1:])
            out[0] = bytes(first)
        return out


class _EventSocket:
    """The event end: a real socket, whose recv() can be made to fail with ENOBUFS as the kernel's does when
    notifications were dropped."""

    def __init__(self, sock: socket.socket, kernel: FakeKernel) -> None:
        self._sock = sock
        self._kernel = kernel

    def recv(self, n: int) -> bytes:
        if self._kernel.enobufs > 0:
            self._kernel.enobufs -= 1
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return self._sock.recv(n)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def recorded() -> dict[tuple[int, int], bytes]:
    """The recorded dumps, by (request type, family) as NetlinkSource asks for them."""
    read = lambda n: (DATA / f"{n}.bin").read_bytes()  # noqa: E731
    return {(rtnl.RTM_GETLINK, 0): read("links"), (rtnl.RTM_GETNEIGH, 7): read("fdb"),
            (rtnl.RTM_GETSTATS, 0): read("stats"), (rtnl.RTM_GETNEIGH, 0): read("neigh"),
            (rtnl.RTM_GETQDISC, 0): read("qdisc"), (rtnl.RTM_GETLINK, 0, "kind"): read("bridges")}
