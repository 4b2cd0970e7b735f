"""Reply matching on one shared socket, without the socket: identifier, cookie, source address, lateness, RTT
from the TX timestamp when there is one, and expiry order."""
import asyncio
import socket
import struct

from kvmnet.exporter.prober import socket as icmp  # its names: the socket and the packet code it uses


def make(raw=True, family=socket.AF_INET):
    s = icmp.IcmpSocket.__new__(icmp.IcmpSocket)
    s.family, s.raw, s.ident, s.payload_size = family, raw, 0x1111, icmp.PAYLOAD_SIZE
    s.builder = icmp.PacketBuilder(family, s.ident, b"COOKIE!!")
    s.cookie = b"COOKIE!!"
    s.pending = {}
    s.results = []
    s.on_result = lambda p, rtt: s.results.append((p.owner, rtt))
    return s


def reply(ident, seq, cookie=b"COOKIE!!", family=socket.AF_INET, ip_header=True):
    body = struct.pack("!BBHHH", icmp.ECHO_REPLY[family], 0, 0, ident, seq) + cookie + bytes(48)
    return (bytes([0x45]) + bytes(19) + body) if ip_header and family == socket.AF_INET else body


def stamp(ns):
    return [(socket.SOL_SOCKET, icmp.SO_TIMESTAMPING, struct.pack("@qq", ns // 10**9, ns % 10**9) + bytes(32))]


def pend(s, seq, owner, addr="10.0.0.1", sent_ns=1_000_000_000, deadline=10.0):
    p = icmp._Pending(owner, addr, sent_ns, deadline)
    s.pending[seq] = p
    return p


def test_match_uses_rx_minus_tx_timestamp():
    s = make()
    p = pend(s, 7, "g1")
    s._on_tx_timestamp(s.builder.build(7), stamp(1_000_005_000))  # looped copy of our request
    assert p.tx_ns == 1_000_005_000
    s._on_packet(reply(0x1111, 7), stamp(1_000_025_000), ("10.0.0.1", 0))
    assert s.results == [("g1", 20e-6)] and not s.pending


def test_without_tx_timestamp_the_clock_before_sendto_is_used():
    s = make()
    pend(s, 8, "g1")
    s._on_packet(reply(0x1111, 8), stamp(1_000_040_000), ("10.0.0.1", 0))
    assert s.results == [("g1", 40e-6)]


def test_other_processes_replies_are_ignored_on_raw_sockets():
    s = make()
    pend(s, 9, "g1")
    s._on_packet(reply(0x2222, 9), stamp(2_000_000_000), ("10.0.0.1", 0))       # another identifier
    s._on_packet(reply(0x1111, 9, b"fping..."), stamp(2_000_000_000), ("10.0.0.1", 0))  # identifier clash
    s._on_packet(reply(0x1111, 9), stamp(2_000_000_000), ("10.0.0.2", 0))       # another source
    s._on_packet(reply(0x1111, 10), stamp(2_000_000_000), ("10.0.0.1", 0))      # not in flight (late)
    assert s.results == [] and 9 in s.pending


def test_datagram_sockets_have_no_ip_header_and_kernel_chosen_ident():
    s = make(raw=False)
    pend(s, 3, "g1")
    s._on_packet(reply(0x1111, 3, ip_header=False), stamp(1_000_010_000), ("10.0.0.1", 0))
    assert s.results == [("g1", 10e-6)]


def test_ipv6_scoped_source_matches():
    s = make(family=socket.AF_INET6)
    pend(s, 4, "g1", addr="fe80::1")
    s._on_packet(reply(0x1111, 4, family=socket.AF_INET6), stamp(1_000_001_000), ("fe80::1%br0", 0, 0, 5))
    assert s.results == [("g1", 1e-6)]


def test_expire_in_deadline_order_skipping_on_demand_futures():
    s = make()
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        pend(s, 1, fut, deadline=50.0)   # an on-demand probe with its own, later deadline
        pend(s, 2, "a", deadline=1.0)
        pend(s, 3, "b", deadline=2.0)
        pend(s, 4, "c", deadline=3.0)
        assert s.expire(2.5) == 3.0
        assert s.results == [("a", None), ("b", None)]
        assert sorted(s.pending) == [1, 4]
    finally:
        loop.close()
