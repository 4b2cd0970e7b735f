"""A stand-in for QEMU that holds real taps the way libvirt hands them over: run it as

    /tmp/x/qemu-system-x86_64 fake_qemu.py TAP[,TAP...] -name guest=vm1 -netdev tap,fd=3,id=n0 ...

where /tmp/x/qemu-system-x86_64 is a symlink to the Python interpreter.
It creates each named tap (TUNSETIFF on /dev/net/tun, in the namespace it runs in), places the descriptors at
3, 4, ... as the command line says, prints "ready" and sleeps. Its /proc/PID/cmdline reads like QEMU's; only
the kernel objects matter to the exporter: /proc/PID/fdinfo/3 says `iff: TAP`. Standard library only.
"""
import ctypes
import fcntl
import os
import struct
import sys
import time

TUNSETIFF = 0x400454CA  # <linux/if_tun.h>
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000

CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
# FAKE_QEMU_TAP_NETNS=NAME: create the taps in that namespace and come back, as libvirt does for QEMU (the process
# then lives in one namespace and its taps in another).
tap_ns = os.environ.get("FAKE_QEMU_TAP_NETNS")
home = fcntl.fcntl(os.open("/proc/self/ns/net", os.O_RDONLY), fcntl.F_DUPFD_CLOEXEC, 100)  # clear of 3, 4, ...
if tap_ns:
    target = os.open(f"/run/netns/{tap_ns}", os.O_RDONLY)
    assert libc.setns(target, CLONE_NEWNET) == 0
    os.close(target)
taps = sys.argv[1].split(",")
for i, name in enumerate(taps):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    os.dup2(fd, 3 + i, inheritable=True)
    if fd != 3 + i:
        os.close(fd)
assert libc.setns(home, CLONE_NEWNET) == 0
print("ready", flush=True)
while True:
    time.sleep(3600)
