"""Answer ICMP echo requests after a fixed delay, from user space: the delay witness on kernels without sch_netem.

Run inside a guest namespace whose kernel echo replies are off (net.ipv4.icmp_echo_ignore_all=1,
net.ipv6.icmp.echo_ignore_all=1):  python delay_responder.py 0.005
Raw sockets get a copy of every echo request before the kernel would answer it; we answer each `delay` seconds
after the kernel received it (SO_TIMESTAMPNS). Standard library only: MUST NOT import kvmnet.
"""
import heapq
import select
import socket
import struct
import sys
import time

SO_TIMESTAMPNS = 35


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def main() -> None:
    delay = float(sys.argv[1])
    v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    for s in (v4, v6):
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    due: list = []
    print("ready", flush=True)
    while True:
        timeout = max(due[0][0] - time.time(), 0) if due else None
        ready, _, _ = select.select([v4, v6], [], [], timeout)
        for s in ready:
            data, anc, _f, addr = s.recvmsg(4096, 64)
            ts = time.time()
            for level, typ, d in anc:
                if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("@qq", d[:16])
                    ts = sec + nsec / 1e9
            if s is v4:
                icmp = data[(data[0] & 0x0F) * 4:]
                if icmp[:1] != b"\x08":
                    continue
                reply = b"\x00\x00\x00\x00" + icmp[4:]
                reply = reply[:2] + struct.pack("!H", checksum(reply)) + reply[4:]
            else:
                if data[:1] != b"\x80":
                    continue
                reply = b"\x81\x00\x00\x00" + data[4:]  # the kernel fills in the ICMPv6 checksum
            heapq.heappush(due, (ts + delay, id(reply), s, reply, addr))
        now = time.time()
        while due and due[0][0] <= now:
            _, _, s, reply, addr = heapq.heappop(due)
            s.sendto(reply, addr)


if __name__ == "__main__":
    main()
