"""A fake ICMP kernel for the unit tier: the real Prober loop and IcmpSocket (sending, TX/RX timestamps, matching,
expiry) against a socket that answers echo requests as told, without root.

    net = FakeIcmp({"10.0.0.1": 50e-6, "10.0.0.2": DROP, "10.0.0.3": UNREACHABLE})
    prober = Prober(..., socket_factory=net.factory)

Per address: a float is the RTT of its reply (the TX timestamp is the send time, the RX timestamp that plus the
RTT, so the prober must measure it exactly), DROP never answers, UNREACHABLE makes sendto fail (EHOSTUNREACH),
LATE answers after `late` seconds (past the prober's timeout), FOREIGN answers with another process's cookie.
The socket's fd (for the event loop's add_reader) is one end of a socketpair that gets a byte per queued datagram.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import socket
import struct
import time

from kvmnet.exporter.prober import socket as icmp
from kvmnet.exporter.prober.packets import ECHO_REPLY, ECHO_REQUEST

DROP, UNREACHABLE, LATE, FOREIGN = "drop", "unreachable", "late", "foreign"


def stamp(ns: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, icmp.SO_TIMESTAMPING, struct.pack("@qq", ns // 10**9, ns % 10**9) + bytes(32))]


class FakeIcmp:
    def __init__(self, answers: dict[str, object], late: float = 0.3, mode: str = "raw") -> None:
        self.answers = answers  # address -> RTT seconds | DROP | UNREACHABLE | LATE | FOREIGN; changeable live
        self.late = late
        self.mode = mode
        self.sent: list[tuple[str, int]] = []  # (address, seq) of every request that left
        self.sockets: list[FakeIcmpSocket] = []
        self.fail_open: OSError | None = None  # raised by the next opens, as open_icmp_socket would

    def opener(self, netns: str, family: int, mode: str) -> tuple[FakeIcmpSocket, str]:
        if self.fail_open is not None:
            raise self.fail_open
        s = FakeIcmpSocket(self, family, self.mode)
        self.sockets.append(s)
        return s, self.mode

    def factory(self, netns, family, loop, on_result, mode, payload_size, tx_timestamps):
        """Prober's socket_factory: the real IcmpSocket on a fake kernel socket."""
        return icmp.IcmpSocket(netns, family, loop, on_result, mode, payload_size, tx_timestamps, opener=self.opener)


class FakeIcmpSocket:
    def __init__(self, net: FakeIcmp, family: int, mode: str) -> None:
        self.net, self.family, self.raw = net, family, mode == "raw"
        self._r, self._w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._r.setblocking(False)
        self.rx: collections.deque = collections.deque()
        self.errq: collections.deque = collections.deque()
        self.options: dict[tuple[int, int], object] = {}
        self.closed = False

    # the socket API IcmpSocket uses
    def fileno(self) -> int:
        return self._r.fileno()

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, level: int, opt: int, value) -> None:
        self.options[(level, opt)] = value

    def bind(self, addr) -> None:
        pass

    def getsockname(self):
        return ("0.0.0.0", 4242)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._r.close()
            self._w.close()

    def sendto(self, packet: bytes, addr) -> int:
        address = addr[0]
        answer = self.net.answers.get(address, DROP)
        if answer == UNREACHABLE:
            raise OSError(errno.EHOSTUNREACH, "No route to host")
        typ, _code, _sum, ident, seq = struct.unpack_from("!BBHHH", packet)
        assert typ == ECHO_REQUEST[self.family]
        self.net.sent.append((address, seq))
        tx = time.time_ns()
        self.errq.append((packet, stamp(tx)))  # the looped request with its TX timestamp
        payload = packet[8:]
        if answer == FOREIGN:
            payload = b"NOTOURS!" + payload[8:]
        reply = struct.pack("!BBHHH", ECHO_REPLY[self.family], 0, 0, ident, seq) + payload
        if self.raw and self.family == socket.AF_INET:
            reply = bytes([0x45]) + bytes(19) + reply
        if answer == DROP:
            self._wake()
        elif answer == LATE:
            asyncio.get_running_loop().call_later(self.net.late, self._deliver, reply, address,
                                                  tx + int(self.net.late * 1e9))
            self._wake()
        else:
            rtt = float(answer) if answer != FOREIGN else 10e-6
            self._deliver(reply, address, tx + int(rtt * 1e9))
        return len(packet)

    def _deliver(self, reply: bytes, address: str, rx_ns: int) -> None:
        if self.closed:
            return
        self.rx.append((reply, stamp(rx_ns), address))
        self._wake()

    def _wake(self) -> None:
        self._w.send(b"x")

    def recvmsg(self, bufsize: int, ancsize: int = 0, flags: int = 0):
        if flags & socket.MSG_ERRQUEUE:
            if not self.errq:
                raise BlockingIOError
            data, anc = self.errq.popleft()
            return data, anc, 0, None
        try:
            self._r.recv(1)
        except BlockingIOError:
            pass
        if not self.rx:
            raise BlockingIOError
        data, anc, address = self.rx.popleft()
        return data, anc, 0, (address, 0)
