"""The ICMP prober: one socket per (namespace, address family) carries every guest's echo requests.

Why not icmplib's multiping or smokeping_prober's shape: with one raw socket per host, every socket receives every
reply and each reply is read N times, so at 250 guests icmplib reports ~300 ms for a 20 us RTT (DESIGN.md). Here
one socket per namespace and family is read once per reply by an `add_reader` callback on the event loop, replies
are matched by (identifier, sequence), and RTT is taken from kernel timestamps, so a busy event loop or a scrape
holding the GIL does not inflate it:
- receive: SO_TIMESTAMPING software RX timestamp, taken when the packet entered the stack;
- send: the software TX timestamp the driver takes as it hands the packet on (veth, tun and the bridge path
  report it on the socket's error queue); when none arrives, the clock read just before `sendto`.

Modes: a raw socket (needs CAP_NET_RAW) sees every ICMP reply in its namespace, so replies are filtered by our
identifier, a per-socket cookie in the payload and the source address; a kernel ICMP filter keeps other types
out. Without CAP_NET_RAW a datagram ICMP socket is used ("ping socket", needs the caller's group in that
namespace's net.ipv4.ping_group_range); the kernel rewrites the identifier to the socket's port and delivers only
our replies.

Packets are built here rather than with icmplib's `ICMPSocket._create_packet`: that builder computes the checksum
in a Python loop per packet, and the payload here is constant, so its sum is computed once per socket. The unit
tests check the bytes against icmplib's builder.

Scheduling: targets are sent in a fixed order, spread evenly over the interval, in batches at most every 10 ms
(a 1000-guest, 1 s interval run wakes 100 times a second, not 1000). A probe is lost when no reply arrived within
`timeout`; a guest is down after `down_after` consecutive lost probes. Send errors (no route, namespace gone)
count as requests, as send errors and as lost probes: the guest is unreachable from here either way.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import random
import socket
import struct
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from kvmnet.common import netns as nsmod

log = logging.getLogger("kvmnet.icmp")

# <asm-generic/socket.h>, <linux/net_tstamp.h>; Python's socket module lacks these.
SO_TIMESTAMPNS = 35
SO_TIMESTAMPING = 37
SOF_TIMESTAMPING_TX_SOFTWARE = 1 << 1
SOF_TIMESTAMPING_RX_SOFTWARE = 1 << 3
SOF_TIMESTAMPING_SOFTWARE = 1 << 4
SOL_RAW = 255
ICMP_FILTER = 1  # <linux/icmp.h>: bitmask of ICMP types to drop on a raw socket
ICMP6_FILTER = 1  # <linux/icmpv6.h>

ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
PROTO = {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: socket.IPPROTO_ICMPV6}
FAMILY_NAME = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}

PAYLOAD_SIZE = 56  # fping's and ping's default: 64-byte ICMP messages
COOKIE_SIZE = 8
ANC_SIZE = socket.CMSG_SPACE(48) + socket.CMSG_SPACE(16) + socket.CMSG_SPACE(64)  # timestamps + IP_RECVERR
RECENT = 256  # raw RTTs kept per guest: exact quantiles for /probe-style checks and tests, not exported
RETRY_OPEN = 1.0  # seconds before trying again to open a socket that failed (namespace gone, not permitted)
TICK = 0.01  # the finest batch spacing of sends, seconds

# 10 us, 20 us, ... 5.24 s: 20 exponential buckets spanning a veth pair to a congested WAN.
BUCKETS: tuple[float, ...] = tuple(10e-6 * 2 ** i for i in range(20))


class ProbeUnavailable(OSError):
    """No ICMP socket can be opened here; str() is one line saying what to grant."""


# ---------------------------------------------------------------------------------------------------------------
# Pure packet code (tests/unit/test_icmp_packets.py).

def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class PacketBuilder:
    """Echo requests for one socket: constant payload (cookie + zeros), so only the header's sum changes."""

    def __init__(self, family: int, ident: int, cookie: bytes, payload_size: int = PAYLOAD_SIZE) -> None:
        self.type = ECHO_REQUEST[family]
        self.ident = ident
        self.payload = cookie + bytes(max(payload_size - len(cookie), 0))
        padded = self.payload + b"\0" * (len(self.payload) % 2)
        self._payload_sum = sum(struct.unpack(f"!{len(padded) // 2}H", padded))

    def build(self, seq: int) -> bytes:
        s = self._payload_sum + (self.type << 8) + self.ident + seq
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return struct.pack("!BBHHH", self.type, 0, ~s & 0xFFFF, self.ident, seq) + self.payload


def icmp_offset(data: bytes, family: int, raw: bool) -> int:
    """Where the ICMP header starts in a received datagram: raw IPv4 sockets include the IP header."""
    if family == socket.AF_INET and raw:
        return (data[0] & 0x0F) * 4 if data else 0
    return 0


def parse_echo_reply(data: bytes, family: int, raw: bool) -> tuple[int, int, bytes] | None:
    """(identifier, sequence, first payload bytes) of an echo reply, or None for anything else."""
    off = icmp_offset(data, family, raw)
    if len(data) < off + 8 + COOKIE_SIZE or data[off] != ECHO_REPLY[family] or data[off + 1] != 0:
        return None
    ident, seq = struct.unpack_from("!HH", data, off + 4)
    return ident, seq, data[off + 8:off + 8 + COOKIE_SIZE]


def parse_looped_request(data: bytes, family: int, payload_size: int) -> tuple[int, int] | None:
    """(identifier, sequence) of our own echo request as looped back with a TX timestamp on the error queue.

    The copy starts at whatever header the kernel timestamped it at (Ethernet, IP or ICMP), so the ICMP header is
    found from the end: our messages are always 8 + payload_size bytes long.
    """
    off = len(data) - 8 - payload_size
    if off < 0 or data[off] != ECHO_REQUEST[family]:
        return None
    ident, seq = struct.unpack_from("!HH", data, off + 4)
    return ident, seq


def timestamp_ns(ancdata: Iterable[tuple[int, int, bytes]]) -> int | None:
    """The software timestamp (CLOCK_REALTIME ns) from SCM_TIMESTAMPING or SCM_TIMESTAMPNS control messages."""
    for level, typ, data in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if typ == SO_TIMESTAMPING and len(data) >= 16:
            sec, nsec = struct.unpack_from("@qq", data, 0)  # ts[0] is the software stamp
            if sec or nsec:
                return sec * 1_000_000_000 + nsec
        elif typ == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack_from("@qq", data, 0)
            return sec * 1_000_000_000 + nsec
    return None


def bucket_index(rtt: float) -> int:
    """Index of the first bucket whose upper bound is >= rtt (len(BUCKETS) for +Inf)."""
    return bisect_left(BUCKETS, rtt)


# ---------------------------------------------------------------------------------------------------------------
# Targets and their counters.

@dataclass(frozen=True)
class Target:
    """A guest to ping: `name` is the guest label, `netns` where to ping it from ("" = the exporter's own)."""
    name: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    netns: str = ""
    mac: str = ""
    bridge: str = ""
    device: str = ""
    source: str = "config"  # config | lab | discovery

    @classmethod
    def of(cls, obj: Any) -> "Target":
        """From any object with name/address/netns (config's Target, service's ProbeTarget, a lab Guest)."""
        if isinstance(obj, Target):
            return obj
        addr = obj.address
        addr = getattr(addr, "ip", addr)  # an IPv4Interface from a lab file
        return cls(str(obj.name), ipaddress.ip_address(addr), getattr(obj, "netns", None) or "",
                   getattr(obj, "mac", "") or "", getattr(obj, "bridge", "") or "", getattr(obj, "device", "") or "",
                   getattr(obj, "source", "config") or "config")

    @property
    def key(self) -> tuple[str, str]:
        return (self.netns, self.name)


class GuestState:
    """Counters of one target; survives target list replacements while (netns, name) stays."""

    __slots__ = ("target", "addr", "family", "requests", "replies", "send_errors", "lost_in_row", "up",
                 "last_reply", "buckets", "rtt_sum", "last_error", "recent")

    def __init__(self, target: Target) -> None:
        self.requests = self.replies = self.send_errors = self.lost_in_row = 0
        self.up = False  # unknown until the first reply: never answered is not up
        self.last_reply = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.rtt_sum = 0.0
        self.last_error = ""
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT)  # raw RTTs, for quantiles
        self.retarget(target)

    def retarget(self, target: Target) -> None:
        self.target = target
        self.addr = str(target.address)
        self.family = socket.AF_INET if target.address.version == 4 else socket.AF_INET6

    def on_reply(self, rtt: float, now: float) -> None:
        self.replies += 1
        self.lost_in_row = 0
        self.up = True
        self.last_reply = now
        self.buckets[bucket_index(rtt)] += 1
        self.rtt_sum += rtt
        self.recent.append(rtt)

    def on_loss(self, down_after: int) -> None:
        self.lost_in_row += 1
        if self.lost_in_row >= down_after:
            self.up = False

    def cumulative(self) -> list[int]:
        out, c = [], 0
        for n in self.buckets[:-1]:
            c += n
            out.append(c)
        return out


class _Pending:
    __slots__ = ("owner", "addr", "sent_ns", "tx_ns", "deadline")

    def __init__(self, owner: Any, addr: str, sent_ns: int, deadline: float) -> None:
        self.owner = owner  # GuestState, or an asyncio.Future for on-demand probes
        self.addr = addr
        self.sent_ns = sent_ns
        self.tx_ns = 0
        self.deadline = deadline


# ---------------------------------------------------------------------------------------------------------------
# One socket per (namespace, family).

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
        f"or set net.ipv4.ping_group_range to include gid {gid} there (sysctl -w net.ipv4.ping_group_range='{gid} {gid}')")


class IcmpSocket:
    """One ICMP socket on the event loop: sends echo requests, matches replies to pending probes."""

    def __init__(self, netns: str, family: int, loop: asyncio.AbstractEventLoop, on_result: Callable,
                 mode: str = "auto", payload_size: int = PAYLOAD_SIZE, tx_timestamps: bool = True) -> None:
        self.netns = netns
        self.family = family
        self.loop = loop
        self.on_result = on_result  # (pending, rtt seconds | None) -> None
        self.payload_size = payload_size
        self.inode = nsmod.inode(netns) if netns else 0
        self.sock, self.mode = open_icmp_socket(netns, family, mode)
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
            self.sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", ~(1 << ECHO_REPLY[socket.AF_INET]) & 0xFFFFFFFF))
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

    def _on_tx_timestamp(self, data: bytes, anc: list) -> None:
        got = parse_looped_request(data, self.family, self.payload_size)
        if got is None:
            return
        ident, seq = got
        p = self.pending.get(seq)
        if p is not None and (not self.raw or ident == self.ident) and not p.tx_ns:
            ts = timestamp_ns(anc)
            if ts:
                p.tx_ns = ts

    def _on_packet(self, data: bytes, anc: list, addr: tuple) -> None:
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


# ---------------------------------------------------------------------------------------------------------------
# The prober.

class Prober:
    """Background ICMP probing of a replaceable list of targets.

        prober = Prober(interval=1.0, timeout=1.0, down_after=3)
        prober.set_targets([Target("vm1", ip_address("10.0.0.11"), "lab-host")])
        await prober.start(); ...; prober.snapshot(); ...; await prober.stop()
    """

    def __init__(self, interval: float = 1.0, timeout: float = 1.0, down_after: int = 3, mode: str = "auto",
                 payload_size: int = PAYLOAD_SIZE, tx_timestamps: bool = True) -> None:
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.down_after = int(down_after)
        self.mode = mode
        self.payload_size = payload_size
        self.tx_timestamps = tx_timestamps
        self.lock = threading.Lock()  # guards `states` and their counters against the scrape threads
        self.states: dict[tuple[str, str], GuestState] = {}
        self._order: list[GuestState] = []
        self._sockets: dict[tuple[str, int], IcmpSocket] = {}
        self._unavailable: dict[tuple[str, int], str] = {}  # (netns, family) -> why; logged once
        self._retry_at: dict[tuple[str, int], float] = {}  # (netns, family) -> loop time to try opening again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.sources: dict[str, list[Target]] = {}  # "static", "discovery": merged in that order of precedence

    # -- targets -------------------------------------------------------------------------------------------------
    def set_targets(self, targets: Iterable[Any], source: str = "static") -> None:
        """Replace the targets of one source; counters of targets that stay (same netns and name) are kept."""
        self.sources[source] = [Target.of(t) for t in targets]
        self._merge()

    def _merge(self) -> None:
        chosen: dict[tuple[str, str], Target] = {}
        addrs: set[tuple[str, str]] = set()
        for source in sorted(self.sources, key=lambda s: (s != "static", s)):
            for t in self.sources[source]:
                akey = (t.netns, str(t.address))
                if t.key in chosen or akey in addrs:
                    continue  # first one wins: config over lab over discovery
                chosen[t.key] = t
                addrs.add(akey)
        with self.lock:
            states = {}
            for key, t in chosen.items():
                st = self.states.get(key)
                if st is None:
                    st = GuestState(t)
                elif st.target != t:
                    st.retarget(t)
                states[key] = st
            self.states = states
            # Interleave namespaces so a namespace's sends are spread over the interval too.
            self._order = sorted(states.values(), key=lambda s: (s.target.netns, s.target.name))
        self._wake.set()

    def targets(self) -> list[Target]:
        with self.lock:
            return [s.target for s in self._order]

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="kvmnet-prober")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for s in self._sockets.values():
            s.close()
        self._sockets.clear()

    # -- sockets -------------------------------------------------------------------------------------------------
    def socket_for(self, netns: str, family: int) -> IcmpSocket | None:
        """The open socket for (netns, family), opening it if needed; None when it cannot be had (logged once)."""
        key = (netns, family)
        s = self._sockets.get(key)
        if s is not None:
            return s
        loop = self._loop or asyncio.get_running_loop()
        if loop.time() < self._retry_at.get(key, 0.0):
            return None  # failed a moment ago: not one setns + two socket() calls per target per cycle
        try:
            s = IcmpSocket(netns, family, self._loop or asyncio.get_running_loop(), self._on_result, self.mode,
                           self.payload_size, self.tx_timestamps)
        except nsmod.NetnsGone as exc:
            self._retry_at[key] = loop.time() + RETRY_OPEN
            self._note_unavailable(key, "netns_gone", str(exc))
            return None
        except OSError as exc:
            self._retry_at[key] = loop.time() + RETRY_OPEN
            self._note_unavailable(key, "probe_socket_failed", str(exc))
            return None
        self._retry_at.pop(key, None)
        self._sockets[key] = s
        if key in self._unavailable:
            del self._unavailable[key]
            _event("probe_socket_opened", netns=netns, family=FAMILY_NAME[family], mode=s.mode, again="true")
        else:
            _event("probe_socket_opened", logging.DEBUG, netns=netns, family=FAMILY_NAME[family], mode=s.mode)
        return s

    def _note_unavailable(self, key: tuple[str, int], name: str, why: str) -> None:
        if self._unavailable.get(key) != why:
            self._unavailable[key] = why
            _event(name, logging.WARNING if name == "netns_gone" else logging.ERROR,
                   netns=key[0], family=FAMILY_NAME[key[1]], error=why)

    def _check_namespaces(self) -> None:
        """Close sockets of namespaces deleted (or replaced) under us: an open socket would keep a deleted
        namespace alive, guests and all. They are reopened when the name comes back."""
        for key, s in list(self._sockets.items()):
            if not s.netns:
                continue
            try:
                alive = nsmod.inode(s.netns) == s.inode
                why = f"network namespace {s.netns!r} was replaced"
            except nsmod.NetnsGone as exc:
                alive, why = False, str(exc)
            if not alive:
                del self._sockets[key]
                s.close()
                for p in list(s.pending.values()):
                    self._on_result(p, None)
                s.pending.clear()
                self._note_unavailable(key, "netns_gone", why)

    def _prune(self, order: list[GuestState]) -> None:
        """Forget sockets and failures of (namespace, family) pairs no target uses any more (after a reload)."""
        used = {(st.target.netns, st.family) for st in order}
        for key in [k for k in self._unavailable if k not in used]:
            del self._unavailable[key]
            self._retry_at.pop(key, None)
        for key in [k for k, s in self._sockets.items() if k not in used and not s.pending]:
            self._sockets.pop(key).close()

    def unavailable(self) -> dict[tuple[str, int], str]:
        return dict(self._unavailable)  # a C-level copy: safe from a scrape thread

    # -- the loop ------------------------------------------------------------------------------------------------
    def _on_result(self, p: _Pending, rtt: float | None) -> None:
        owner = p.owner
        if isinstance(owner, GuestState):
            with self.lock:
                if rtt is None:
                    owner.on_loss(self.down_after)
                else:
                    owner.on_reply(rtt, time.time())
        elif not owner.done():
            owner.set_result(rtt)

    def _send(self, st: GuestState) -> None:
        s = self.socket_for(st.target.netns, st.family)
        with self.lock:
            st.requests += 1
        if s is not None:
            try:
                s.send(st, st.addr, self.timeout)
                if st.last_error:
                    st.last_error = ""
                return
            except OSError as exc:
                err = exc.strerror or str(exc)
        else:
            err = self._unavailable.get((st.target.netns, st.family), "no socket")
        with self.lock:
            st.send_errors += 1
            st.on_loss(self.down_after)
        if st.last_error != err:  # once per guest per kind of error
            st.last_error = err
            _event("probe_send_failed", logging.DEBUG if s is None else logging.WARNING, netns=st.target.netns,
                   guest=st.target.name, address=st.addr, error=err)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        order: list[GuestState] = []
        i = 0
        cycle_start = loop.time()
        while True:
            now = loop.time()
            while True:
                if i >= len(order) and now >= cycle_start + (self.interval if order else 0):
                    # A new cycle: pick up target and namespace changes. Cycles follow each other on the
                    # interval's grid (a 10 ms tick may run several 5 ms cycles); after a stall longer than
                    # that, restart at now rather than send the missed cycles in a burst.
                    cycle_start = cycle_start + self.interval if order else now
                    if now - cycle_start > max(self.interval, 5 * TICK):
                        cycle_start = now
                    self._check_namespaces()
                    with self.lock:
                        order = list(self._order)
                    self._prune(order)
                    i = 0
                slot = self.interval / max(len(order), 1)
                while i < len(order) and cycle_start + i * slot <= now:
                    self._send(order[i])
                    i += 1
                if i < len(order) or not order or now < cycle_start + self.interval:
                    break
            nxt = cycle_start + i * slot if i < len(order) else cycle_start + self.interval
            for s in list(self._sockets.values()):
                d = s.expire(now)
                if d is not None and d < nxt:
                    nxt = d
            delay = max(nxt - loop.time(), TICK)
            if order:
                await asyncio.sleep(delay)
            else:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    # -- reading -------------------------------------------------------------------------------------------------
    def snapshot(self) -> list[tuple[Target, bool, int, int, int, float, list[int], float, int]]:
        """(target, up, requests, replies, send_errors, last_reply, cumulative buckets, rtt sum, rtt count)."""
        with self.lock:
            out = []
            for st in self._order:
                out.append((st.target, st.up, st.requests, st.replies, st.send_errors, st.last_reply,
                            st.cumulative(), st.rtt_sum, sum(st.buckets)))
            return out

    def sockets(self) -> list[tuple[str, str, str]]:
        socks = list(self._sockets.values())  # one C-level copy: the loop thread may add one meanwhile
        return sorted((s.netns, FAMILY_NAME[s.family], s.mode) for s in socks)

    # -- on demand -----------------------------------------------------------------------------------------------
    async def probe(self, address: str, netns: str = "", count: int = 3, budget: float = 3.0) -> "ProbeResult":
        """Ping `address` `count` times within `budget` seconds on the shared socket (blackbox-style)."""
        addr = ipaddress.ip_address(address)
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        start = loop.time()
        result = ProbeResult(sent=0, rtts=[], errors=[])
        # Spread the packets over the first half of the budget and wait for replies until its end.
        gap = min(0.2, budget / 2 / max(count, 1))
        sent: list[tuple[asyncio.Future, IcmpSocket, _Pending]] = []
        for k in range(count):
            result.sent += 1
            # Asked each time: the background loop may have closed an idle socket or the namespace may be gone.
            s = self.socket_for(netns, family)
            if s is None:
                result.errors.append(self._unavailable.get((netns, family), "no socket"))
                continue
            fut = loop.create_future()
            try:
                sent.append((fut, s, s.send(fut, str(addr), max(start + budget - loop.time(), 0))))
            except OSError as exc:
                result.errors.append(exc.strerror or str(exc))
            if k + 1 < count:
                await asyncio.sleep(gap)
        if sent:
            await asyncio.wait([f for f, _, _ in sent], timeout=max(start + budget - loop.time(), 0))
        for fut, s, p in sent:
            if fut.done() and fut.result() is not None:
                result.rtts.append(fut.result())
            else:
                s.forget(p)
        result.duration = loop.time() - start
        return result


@dataclass
class ProbeResult:
    sent: int
    rtts: list[float]
    errors: list[str]
    duration: float = 0.0

    @property
    def success(self) -> bool:
        return bool(self.rtts)


def _event(name: str, level: int = logging.INFO, **fields: object) -> None:
    if log.isEnabledFor(level):
        log.log(level, "event=%s %s", name, " ".join(f"{k}={_q(v)}" for k, v in fields.items()))


def _q(v: object) -> str:
    s = str(v)
    if s and not any(c in s for c in ' ="\\\n'):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
