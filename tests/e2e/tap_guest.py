"""A guest in miniature behind a real tap, for tests that need one faster than QEMU boots. Run it as

    /tmp/x/qemu-system-x86_64 tap_guest.py TAP IPV4 MAC -name vm1 -netdev tap,id=n0,ifname=TAP \
        -device virtio-net-pci,netdev=n0,mac=MAC

where /tmp/x/qemu-system-x86_64 is a symlink to the Python interpreter, so that /proc/PID/cmdline reads like QEMU's
and kvmnet's identity source names the guest. Like QEMU it opens TAP (TUNSETIFF on /dev/net/tun; a persistent tap
made with `ip tuntap add` keeps existing, without carrier, once this process dies), then answers ARP requests for
IPV4 and ICMP echo requests to it, from MAC. Prints "ready" once it holds the tap.

Faults, by signal:
- SIGUSR1: answer echo requests 100 ms late from now on (a guest starved of CPU; no netem needed);
- SIGUSR2: send one frame from each of 40 made-up source MACs (KVMNET_TEST_FLOOD in the environment says how
  many), as a guest flooding or spoofing MACs does: the bridge learns them on the tap. Again to refresh them.
Standard library only.
"""
import fcntl
import heapq
import ipaddress
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA  # <linux/if_tun.h>
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
DELAY = 0.1
FLOOD = int(os.environ.get("KVMNET_TEST_FLOOD", "40"))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def answer(frame: bytes, ip: bytes, mac: bytes) -> bytes | None:
    """The reply to one Ethernet frame, or None."""
    if len(frame) < 14:
        return None
    dst, src, etype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    body = frame[14:]
    if etype == 0x0806 and len(body) >= 28:  # ARP
        htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", body[:8])
        sha, spa, tpa = body[8:14], body[14:18], body[24:28]
        if op == 1 and tpa == ip:
            arp = struct.pack("!HHBBH", htype, ptype, hlen, plen, 2) + mac + ip + sha + spa
            return src + mac + struct.pack("!H", 0x0806) + arp
        return None
    if etype == 0x0800 and len(body) >= 20 and dst in (mac, b"\xff" * 6):
        ihl = (body[0] & 0x0F) * 4
        total = struct.unpack("!H", body[2:4])[0]
        if body[9] != 1 or body[16:20] != ip or total > len(body):
            return None
        icmp = bytearray(body[ihl:total])
        if len(icmp) < 8 or icmp[0] != 8:
            return None
        icmp[0] = 0
        icmp[2:4] = b"\0\0"
        icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
        hdr = bytearray(body[:ihl])
        hdr[8] = 64
        hdr[12:16], hdr[16:20] = body[16:20], body[12:16]
        hdr[10:12] = b"\0\0"
        hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
        return src + mac + struct.pack("!H", 0x0800) + bytes(hdr) + bytes(icmp)
    return None


def main() -> None:
    tap, ip, mac = sys.argv[1], ipaddress.IPv4Address(sys.argv[2]).packed, mac_bytes(sys.argv[3])
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
    state = {"delay": 0.0, "flood": False}
    signal.signal(signal.SIGUSR1, lambda *_: state.update(delay=DELAY))
    signal.signal(signal.SIGUSR2, lambda *_: state.update(flood=True))
    print("ready", flush=True)
    pending: list[tuple[float, int, bytes]] = []
    seq = 0
    while True:
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            os.write(fd, heapq.heappop(pending)[2])
        if state["flood"]:
            state["flood"] = False
            for i in range(FLOOD):
                fake = bytes([0x02, 0xEE, 0, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])
                os.write(fd, b"\xff" * 6 + fake + struct.pack("!H", 0x88B5) + b"kvmnet-test".ljust(46, b"\0"))
        timeout = max(0.0, pending[0][0] - now) if pending else 0.5
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        except InterruptedError:
            continue
        if not ready:
            continue
        frame = os.read(fd, 65536)
        reply = answer(frame, ip, mac)
        if reply is None:
            continue
        if reply[12:14] == b"\x08\x00" and state["delay"]:
            seq += 1
            heapq.heappush(pending, (time.monotonic() + state["delay"], seq, reply))
        else:
            os.write(fd, reply)


if __name__ == "__main__":
    main()
