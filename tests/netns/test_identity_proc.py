"""GuestDirectory against real processes: a QEMU-like process holding real tap descriptors in a namespace."""
import subprocess
import time

import pytest

from kvmnet.exporter.sources.identity import GuestDirectory, GuestIdentity
from tests.harness import start_fake_qemu, stop

pytestmark = pytest.mark.netns


def test_libvirt_style_fd_resolved_through_fdinfo(netns_factory, tmp_path):
    ns, other = netns_factory("ki"), netns_factory("ki")
    p = start_fake_qemu(ns, ["vnet0", "vnet1"], [
        "-name", "guest=web01,debug-threads=on",
        "-netdev", '{"type":"tap","fd":"3","vhost":false,"id":"hostnet0"}',
        "-device", '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:6b:3c:58"}',
        "-netdev", "tap,fd=4,id=hostnet1",
        "-device", "virtio-net-pci,netdev=hostnet1,id=net1,mac=52:54:00:6b:3c:59"], tmp_path)
    try:
        d = GuestDirectory(ttl=0, background=False)
        assert d.lookup(ns) == {"vnet0": GuestIdentity("web01", "52:54:00:6b:3c:58", "qemu"),
                                "vnet1": GuestIdentity("web01", "52:54:00:6b:3c:59", "qemu")}
        assert d.lookup(other) == {}  # same names elsewhere are not this guest's
        assert "vnet0" not in d.lookup("")
    finally:
        stop(p)
    assert d.lookup(ns) == {}  # the process is gone: so is the mapping (ttl=0)


def test_tap_passed_from_another_namespace(netns_factory, tmp_path):
    """QEMU runs in one namespace, its tap (passed by descriptor) lives in another: the descriptor decides."""
    qemu_ns, tap_ns = netns_factory("ki"), netns_factory("ki")
    p = start_fake_qemu(qemu_ns, ["vnet5"], ["-name", "guest=far", "-netdev", "tap,fd=3,id=hostnet0",
                                            "-device", "virtio-net-pci,netdev=hostnet0,mac=52:54:00:00:00:05"],
                        tmp_path, tap_netns=tap_ns)
    try:
        assert "vnet5" in subprocess.run(["ip", "-n", tap_ns, "link"], capture_output=True, text=True).stdout
        d = GuestDirectory(ttl=0, background=False)
        assert d.lookup(tap_ns) == {"vnet5": GuestIdentity("far", "52:54:00:00:00:05", "qemu")}
        assert d.lookup(qemu_ns) == {}
    finally:
        stop(p)


def test_named_tap_and_cache(netns_factory, tmp_path):
    ns = netns_factory("ki")
    d = GuestDirectory(ttl=60)
    assert d.lookup(ns) == {}
    p = start_fake_qemu(ns, ["vm1eth0"], ["-name", "vm1", "-netdev", "tap,id=hn0,ifname=vm1eth0,script=no",
                                          "-device", "virtio-net-pci,netdev=hn0,mac=0a:e8:4f:c5:6a:16"], tmp_path)
    try:
        assert d.lookup(ns) == {}  # cached scan
        d.invalidate()
        assert d.lookup(ns) == {"vm1eth0": GuestIdentity("vm1", "0a:e8:4f:c5:6a:16", "qemu")}
    finally:
        stop(p)
    d.ttl = 0  # stale now: the lookup serves the old scan and refreshes in the background
    assert d.lookup(ns) == {"vm1eth0": GuestIdentity("vm1", "0a:e8:4f:c5:6a:16", "qemu")}
    deadline = time.monotonic() + 5
    while d.lookup(ns):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_scan_cost_is_small():
    """Not a timing assertion (bench/ measures); just that a scan of this machine's /proc works and is sane."""
    d = GuestDirectory(ttl=0)
    t = time.perf_counter()
    d.lookup("")
    assert time.perf_counter() - t < 5
