"""Pure ICMP echo packet code: constants, checksum, the request builder, reply parsers, kernel timestamps.
No sockets, no state (tests/unit/test_icmp_packets.py checks the bytes against icmplib's builder).

Packets are built here rather than with icmplib's `ICMPSocket._create_packet`: that builder computes the checksum
in a Python loop per packet, and the payload here is constant, so its sum is computed once per socket.
"""
from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

# <linux/net_tstamp.h>, <asm-generic/socket.h>
SO_TIMESTAMPNS = 35
SO_TIMESTAMPING = 37

ECHO_REQUEST: dict[int, int] = {socket.AF_INET: 8, socket.AF_INET6: 128}
ECHO_REPLY: dict[int, int] = {socket.AF_INET: 0, socket.AF_INET6: 129}
PROTO: dict[int, int] = {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: socket.IPPROTO_ICMPV6}
FAMILY_NAME: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}

PAYLOAD_SIZE = 56  # fping's and ping's default: 64-byte ICMP messages
COOKIE_SIZE = 8


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\x00"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
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
                return int(sec) * 1_000_000_000 + int(nsec)
        elif typ == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack_from("@qq", data, 0)
            return int(sec) * 1_000_000_000 + int(nsec)
    return None
