"""Echo request building and reply parsing, checked against icmplib's own builder and hand-made packets."""
import socket
import struct

import pytest
from icmplib.sockets import ICMPv4Socket, ICMPv6Socket

from kvmnet.exporter.prober import packets as icmp


class _IcmplibBuilder:
    """icmplib's packet builder without its socket: the witness for our bytes."""

    def __init__(self, cls):
        self.obj = cls.__new__(cls)
        self.obj._sock = None  # its __del__ closes the socket

    def build(self, ident, seq, payload):
        return self.obj._create_packet(ident, seq, payload)


@pytest.mark.parametrize("family,cls", [(socket.AF_INET, ICMPv4Socket), (socket.AF_INET6, ICMPv6Socket)])
@pytest.mark.parametrize("ident,seq", [(1, 0), (0xFFFF, 0xFFFF), (0x1234, 0xABCD), (40000, 1)])
def test_build_matches_icmplib(family, cls, ident, seq):
    cookie = bytes(range(1, 9))
    b = icmp.PacketBuilder(family, ident, cookie)
    ours = b.build(seq)
    assert len(ours) == 8 + icmp.PAYLOAD_SIZE
    assert ours == _IcmplibBuilder(cls).build(ident, seq, b.payload)


def test_odd_payload_checksum_matches_icmplib():
    b = icmp.PacketBuilder(socket.AF_INET, 7, b"\xff" * 8, payload_size=33)
    assert b.build(9) == _IcmplibBuilder(ICMPv4Socket).build(7, 9, b.payload)


def test_checksum_of_packet_with_checksum_is_zero():
    pkt = icmp.PacketBuilder(socket.AF_INET, 5, b"abcdefgh").build(77)
    assert icmp.checksum(pkt) == 0


def _reply(family, ident, seq, cookie, ip_header=False):
    body = struct.pack("!BBHHH", icmp.ECHO_REPLY[family], 0, 0, ident, seq) + cookie + bytes(48)
    if ip_header:
        body = bytes([0x45]) + bytes(19) + body
    return body


def test_parse_raw_ipv4_reply_skips_ip_header():
    assert icmp.parse_echo_reply(_reply(socket.AF_INET, 9, 10, b"C" * 8, True), socket.AF_INET, True) == (9, 10, b"C" * 8)


def test_parse_raw_ipv4_with_options():
    data = bytes([0x46]) + bytes(23) + _reply(socket.AF_INET, 1, 2, b"D" * 8)
    assert icmp.parse_echo_reply(data, socket.AF_INET, True) == (1, 2, b"D" * 8)


def test_parse_dgram_and_ipv6_have_no_ip_header():
    assert icmp.parse_echo_reply(_reply(socket.AF_INET, 3, 4, b"x" * 8), socket.AF_INET, False) == (3, 4, b"x" * 8)
    assert icmp.parse_echo_reply(_reply(socket.AF_INET6, 3, 4, b"y" * 8), socket.AF_INET6, True) == (3, 4, b"y" * 8)


@pytest.mark.parametrize("data", [b"", b"\x45" + bytes(10), struct.pack("!BBHHH", 8, 0, 0, 1, 1) + bytes(56),
                                  struct.pack("!BBHHH", 3, 1, 0, 1, 1) + bytes(56)])
def test_parse_rejects_requests_errors_and_short(data):
    assert icmp.parse_echo_reply(data, socket.AF_INET, False) is None


def test_looped_request_found_from_the_end_whatever_headers_precede():
    pkt = icmp.PacketBuilder(socket.AF_INET, 0x4242, b"k" * 8).build(513)
    for prefix in (b"", bytes(20), bytes(14 + 20)):
        assert icmp.parse_looped_request(prefix + pkt, socket.AF_INET, icmp.PAYLOAD_SIZE) == (0x4242, 513)
    assert icmp.parse_looped_request(pkt[:-1], socket.AF_INET, icmp.PAYLOAD_SIZE) is None


def test_timestamp_prefers_software_stamp():
    ts = struct.pack("@qq", 100, 5) + bytes(32)
    assert icmp.timestamp_ns([(socket.SOL_SOCKET, icmp.SO_TIMESTAMPING, ts)]) == 100_000_000_005
    ns = struct.pack("@qq", 7, 8)
    assert icmp.timestamp_ns([(0, 11, b"x"), (socket.SOL_SOCKET, icmp.SO_TIMESTAMPNS, ns)]) == 7_000_000_008
    assert icmp.timestamp_ns([(socket.SOL_SOCKET, icmp.SO_TIMESTAMPING, bytes(48))]) is None
