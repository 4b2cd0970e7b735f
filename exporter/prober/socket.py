"""One ICMP socket per (namespace, address family): opening it (raw, else datagram), sending echo requests and
matching replies to pending probes by (identifier, sequence), with kernel timestamps.

The ICMP prober: one socket per (namespace, address family) carries every guest's echo requests.

Why not icmplib's multiping or smokeping_prober's shape: with one raw socket per host, every socket receives every
reply and each reply is read N times, so at 250 guests icmplib reports ~300 ms for a 20 us RTT (DESIGN.md). Here
one socket per namespace and family is read once per reply by an `add_reader` callback on the event loop, replies
are matched by (identifier, sequence), and RTT is taken from kernel timestamps, so a busy event loop or a scrape
holding the GIL does not inflate it:
- receive: SO_TIMESTAMPING software RX timestamp, taken when the packet entered the stack;
- send: the software TX timestamp the driver takes as it hands the packet on (veth, tun and the bridge path
  report it on the socket's error queue); when none arrives, the clock read just before `sendto`.
"""
from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from kvmnet.common import netns as nsmod

from .packets import (
    COOKIE_SIZE,
    ECHO_REPLY,
    PAYLOAD_SIZE,
    PROTO,
    SO_TIMESTAMPING,
    SO_TIMESTAMPNS,
    PacketBuilder,
    parse_echo_reply,
    parse_looped_request,
    timestamp_ns,
)

SOF_TIMESTAMPING_TX_SOFTWARE = 1 << 1
SOF_TIMESTAMPING_RX_SOFTWARE = 1 << 3
SOF_TIMESTAMPING_SOFTWARE = 1 << 4
SOL_RAW = 255
ICMP_FILTER = 1  # <linux/icmp.h>: bitmask of ICMP types to drop on a raw socket
ICMP6_FILTER = 1  # <linux/icmpv6.h>
ANC_SIZE = socket.CMSG_SPACE(48) + socket.CMSG_SPACE(16) + socket.CMSG_SPACE(64)  # timestamps + IP_RECVERR


class ProbeUnavailable(OSError):
    """No ICMP socket can be opened here; str() is one line saying what to grant."""


class _Pending:
    __slots__ = ("owner", "addr", "sent_ns", "tx_ns", "deadline")

    def __init__(self, owner: Any, addr: str, sent_ns: int, deadline: float) -> None:
        self.owner = owner  # GuestState, or an asyncio.Future for on-demand probes
        self.addr = addr
        self.sent_ns = sent_ns
        self.tx_ns = 0
        self.deadline = deadline


def open_icmp_socket(netns: str, family: int, mode: str = "auto") -> tuple[socket.socket, str]:
    """An ICMP socket created inside `netns`: raw if allowed, else datagram. Raises ProbeUnavailable (one line)."""
    proto = PROTO[family]
    errors = []
    with nsmod.entered(netns):  # NetnsGone / setns failures propagate as they are
        for kind, typ in (("raw", socket.SOCK_RAW), ("dgram", socket.SOCK_DGRAM)):
            if mode not in ("auto", kind):
                continue
            try:
                return socket.socket(family, typ, proto), kind
            except PermissionError as exc:
                errors.append(f"{kind}: {exc.strerror}")
    where = f"network namespace {netns!r}" if netns else "this network namespace"
    gid = os.getgid()
    raise ProbeUnavailable(
        f"ICMP probing not allowed in {where} ({'; '.join(errors)}): grant CAP_NET_RAW, "
        f"or set net.ipv4.ping_group_range to include gid {gid} there "
        f"(sysctl -w net.ipv4.ping_group_range='{gid} {gid}')")


class IcmpSocket:
    """One ICMP socket on the event loop: sends echo requests, matches replies to pending probes."""

    def __init__(self, netns: str, family: int, loop: asyncio.AbstractEventLoop,
                 on_result: Callable[[_Pending, float | None], None],
                 mode: str = "auto", payload_size: int = PAYLOAD_SIZE, tx_timestamps: bool = True,
                 opener: Callable[[str, int, str], tuple[socket.socket, str]] = open_icmp_socket) -> None:
        """`opener(netns, family, mode) -> (socket, "raw" | "dgram")` makes the kernel socket (open_icmp_socket;
        tests/unit/fakeicmp.py injects one that answers echo requests without root)."""
        self.netns = netns
        self.family = family
        self.loop = loop
        self.on_result = on_result  # (pending, rtt seconds | None) -> None
        self.payload_size = payload_size
        self.inode = nsmod.inode(netns) if netns else 0
        self.sock, self.mode = opener(netns, family, mode)
        self.raw = self.mode == "raw"
        self.pending: dict[int, _Pending] = {}
        self._seq = random.randrange(1 << 16)
        s = self.sock
        try:
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            flags = SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE
            if tx_timestamps:
                flags |= SOF_TIMESTAMPING_TX_SOFTWARE
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, flags)
                self.tx_timestamps = tx_timestamps
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self.tx_timestamps = False
            if self.raw:
                self.ident = random.randrange(1, 1 << 16)
                self._filter_echo_replies()
            else:
                s.bind(("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0))
                self.ident = s.getsockname()[1]  # the kernel writes this into every request we send
            self.builder = PacketBuilder(family, self.ident, os.urandom(COOKIE_SIZE), payload_size)
            self.cookie = self.builder.payload[:COOKIE_SIZE]
            loop.add_reader(s.fileno(), self._on_readable)
        except BaseException:
            s.close()
            raise
        self.closed = False

    def _filter_echo_replies(self) -> None:
        """Let only echo replies reach this raw socket: fewer wakeups when the namespace is busy with ICMP."""
        if self.family == socket.AF_INET:
            blocked = ~(1 << ECHO_REPLY[socket.AF_INET]) & 0xFFFFFFFF
            self.sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", blocked))
        else:
            words = [0xFFFFFFFF] * 8
            t = ECHO_REPLY[socket.AF_INET6]
            words[t >> 5] &= ~(1 << (t & 31)) & 0xFFFFFFFF
            self.sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *words))

    def send(self, owner: Any, addr: str, timeout: float) -> _Pending:
        """Send one echo request; raises OSError when the kernel refuses it (no route, ...)."""
        seq = self._seq
        pending = self.pending
        for _ in range(1 << 16):  # skip sequence numbers still in flight (only after a 65536-probe backlog)
            seq = (seq + 1) & 0xFFFF
            if seq not in pending:
                break
        self._seq = seq
        packet = self.builder.build(seq)
        p = _Pending(owner, addr, 0, self.loop.time() + timeout)
        p.sent_ns = time.time_ns()
        self.sock.sendto(packet, (addr, 0))
        pending[seq] = p
        return p

    def _on_readable(self) -> None:
        sock = self.sock
        if self.tx_timestamps:
            for _ in range(1024):
                try:
                    data, anc, _flags, _addr = sock.recvmsg(2048, ANC_SIZE, socket.MSG_ERRQUEUE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                self._on_tx_timestamp(data, anc)
        for _ in range(4096):  # bounded: yield to the loop now and then under a flood
            try:
                data, anc, _flags, addr = sock.recvmsg(2048, ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # a pending socket error (e.g. host unreachable on a ping socket): read and cleared
            self._on_packet(data, anc, addr)

    def _on_tx_timestamp(self, data: bytes, anc: list[tuple[int, int, bytes]]) -> None:
        got = parse_looped_request(data, self.family, self.payload_size)
        if got is None:
            return
        ident, seq = got
        p = self.pending.get(seq)
        if p is not None and (not self.raw or ident == self.ident) and not p.tx_ns:
            ts = timestamp_ns(anc)
            if ts:
                p.tx_ns = ts

    def _on_packet(self, data: bytes, anc: list[tuple[int, int, bytes]], addr: tuple[Any, ...]) -> None:
        got = parse_echo_reply(data, self.family, self.raw)
        if got is None:
            return
        ident, seq, cookie = got
        if (self.raw and ident != self.ident) or cookie != self.cookie:
            return  # someone else's ping (fping, ping) seen by our raw socket
        p = self.pending.get(seq)
        if p is None:
            return  # late: already counted lost
        src = addr[0]
        if src != p.addr and src.split("%", 1)[0] != p.addr:
            return
        del self.pending[seq]
        rx = timestamp_ns(anc) or time.time_ns()
        rtt = (rx - (p.tx_ns or p.sent_ns)) / 1e9
        if rtt < 0:  # the realtime clock stepped back between send and receive
            rtt = 0.0
        self.on_result(p, rtt)

    def expire(self, now: float) -> float | None:
        """Report probes without a reply by their deadline as lost; return the next deadline.

        Background probes share one timeout, so the dict's insertion order is their deadline order and the scan
        stops at the first one still running. On-demand probes (futures) have their own and are skipped past.
        """
        dead, nxt = [], None
        for seq, p in self.pending.items():
            if p.deadline <= now:
                dead.append(seq)
            elif not isinstance(p.owner, asyncio.Future):
                nxt = p.deadline
                break
        for seq in dead:
            self.on_result(self.pending.pop(seq), None)
        return nxt

    def forget(self, seq_or_pending: _Pending) -> None:
        for seq, p in list(self.pending.items()):
            if p is seq_or_pending:
                del self.pending[seq]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError, RuntimeError):
            pass
        self.sock.close()


class IcmpSockets(dict[tuple[str, int], IcmpSocket]):
    """The open ICMP sockets, one per (namespace, family), and the factory that makes them (IcmpSocket's
    signature; tests inject fakes). The Service owns one and lends it to its prober (`Prober.use_sockets`), so
    the service holds every kernel resource; a standalone Prober makes its own."""

    def __init__(self, factory: Callable[..., Any] | None = IcmpSocket) -> None:
        super().__init__()
        self.factory = factory  # None: the borrowing prober's own factory (Prober.use_sockets)

    def close_all(self) -> None:
        for s in self.values():
            s.close()
        self.clear()
