"""A Proxmox VE host's shape, built from real kernel objects and a real QEMU (no Proxmox software is installable
here). What `qm start` leaves on a PVE node, per guest NIC `netN` of VM `VMID`:

    without the guest firewall                 with the guest firewall (firewall=1 on the NIC)

      vmbr0 ── tapVMIDiN ── QEMU                 vmbr0 ── fwprVMIDpN ═veth═ fwlnVMIDiN ── fwbrVMIDiN ── tapVMIDiN ── QEMU

- QEMU runs as `kvm` (PVE's /usr/bin/kvm) with PVE's argv. Here `kvm` is a wrapper that execs Debian's
  qemu-system-x86_64 with argv[0] "kvm" and without `-id VMID`, the one option only PVE's patched QEMU knows; so
  /proc/PID/cmdline reads as on PVE but for `-id`. The argv:
  `-id VMID -name 'NAME,debug-threads=on' -chardev socket,id=qmp,path=.../VMID.qmp,server=on,wait=off
  -mon chardev=qmp,mode=control -pidfile .../VMID.pid -daemonize ... -netdev type=tap,id=net0,ifname=tapVMIDi0,
  script=.../pve-bridge,downscript=.../pve-bridgedown -device virtio-net-pci,mac=MAC,netdev=net0,bus=pci.0,
  addr=0x12,id=net0`.
- QEMU creates the tap itself (not persistent: it vanishes with QEMU) and calls the script with its name;
  PVE's pve-bridge puts it on vmbr0, or with the firewall on fwbrVMIDiN, which PVE made with the veth pair
  fwprVMIDpN (a port of vmbr0) <-> fwlnVMIDiN (a port of fwbrVMIDiN). nftables/iptables rules on fwbr are left
  out: they filter, and the shape is what kvmnet has to see through.
- The host (vmbr0's address) reaches both guests; its neighbour entries are on vmbr0. Frames flooded on vmbr0
  reach fwbrVMIDiN through the veth, so other guests' MACs are learned on fwlnVMIDiN too.

    with ProxmoxHost("kvp") as h:
        h.guest(100, "web01", "10.1.0.100", firewall=True)
        h.guest(101, "db01", "10.1.0.101")
        h.wait_ping("10.1.0.100")

Teardown: every QEMU by its pid file (SIGKILL), then the namespace.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from kvmnet.setup import image
from tests.conftest import delete_netns, unique_name

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"

PVE_BRIDGE = """#!/bin/sh
# pve-bridge in miniature: QEMU passes the tap's name; put it on its bridge (fwbr<vmid>i<n> if the guest
# firewall made one, else vmbr0).
tap="$1"
vmid_n=${tap#tap}
fw="fwbr$vmid_n"
ip link set "$tap" up
if [ -e "/sys/class/net/$fw" ]; then ip link set "$tap" master "$fw"; else ip link set "$tap" master vmbr0; fi
"""
KVM_WRAPPER = """#!/bin/bash
# PVE's kvm is QEMU with Proxmox's patches; upstream QEMU lacks -id VMID: drop it, keep everything else.
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = -id ]; then shift 2; continue; fi
  args+=("$1"); shift
done
exec -a kvm {qemu} "${{args[@]}}"
"""
PVE_BRIDGEDOWN = "#!/bin/sh\nip link set \"$1\" nomaster 2>/dev/null\nexit 0\n"


def mac_of(vmid: int) -> str:
    return f"bc:24:11:00:{vmid >> 8 & 255:02x}:{vmid & 255:02x}"


class ProxmoxHost:
    def __init__(self, prefix: str = "kv", address: str = "10.1.0.1/24") -> None:
        self.ns = unique_name(prefix)
        self.address = address
        self.root = Path(tempfile.mkdtemp(prefix=f"{prefix}pve", dir="/tmp"))
        self.img = image.ensure_image(progress=lambda s: None)
        self.vmids: list[int] = []

    def __enter__(self) -> ProxmoxHost:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.ns, *args], check=True, capture_output=True)

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True)

    def start(self) -> None:
        bindir = self.root / "bin"
        bindir.mkdir()
        (bindir / "kvm").write_text(KVM_WRAPPER.format(qemu=QEMU))  # argv[0] is "kvm", as on PVE
        (bindir / "kvm").chmod(0o755)
        for name, text in (("pve-bridge", PVE_BRIDGE), ("pve-bridgedown", PVE_BRIDGEDOWN)):
            (self.root / name).write_text(text)
            (self.root / name).chmod(0o755)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.ip("link", "set", "lo", "up")
        self.ip("link", "add", "vmbr0", "type", "bridge")
        self.ip("addr", "add", self.address, "dev", "vmbr0")
        self.ip("link", "set", "vmbr0", "up")

    def firewall(self, vmid: int, n: int = 0) -> None:
        """PVE's per-NIC firewall plumbing, made before QEMU starts (as qemu-server's pve-bridge does)."""
        fwbr, fwln, fwpr = f"fwbr{vmid}i{n}", f"fwln{vmid}i{n}", f"fwpr{vmid}p{n}"
        self.ip("link", "add", fwbr, "type", "bridge")
        self.ip("link", "set", fwbr, "up")
        self.ip("link", "add", fwpr, "type", "veth", "peer", "name", fwln)
        self.ip("link", "set", fwpr, "master", "vmbr0")
        self.ip("link", "set", fwln, "master", fwbr)
        self.ip("link", "set", fwpr, "up")
        self.ip("link", "set", fwln, "up")

    def argv(self, vmid: int, name: str, address: str) -> list[str]:
        run = self.root
        return [str(run / "bin" / "kvm"), "-id", str(vmid), "-name", f"{name},debug-threads=on", "-no-shutdown",
                "-chardev", f"socket,id=qmp,path={run}/{vmid}.qmp,server=on,wait=off",
                "-mon", "chardev=qmp,mode=control", "-pidfile", f"{run}/{vmid}.pid", "-daemonize",
                "-smp", "1,sockets=1,cores=1,maxcpus=1", "-nodefaults", "-vga", "none", "-display", "none",
                "-serial", f"file:{run}/{vmid}.console", "-machine", "pc", "-accel", "tcg", "-m", "128",
                "-kernel", str(self.img.kernel), "-initrd", str(self.img.initrd),
                "-append", f"console=ttyS0 quiet panic=-1 kvmnet.ip={address}/24 kvmnet.name={name}",
                "-netdev", f"type=tap,id=net0,ifname=tap{vmid}i0,script={run}/pve-bridge,"
                           f"downscript={run}/pve-bridgedown,vhost=off",
                "-device", f"virtio-net-pci,mac={mac_of(vmid).upper()},netdev=net0,bus=pci.0,addr=0x12,id=net0,"
                           f"rx_queue_size=1024,tx_queue_size=1024"]

    def guest(self, vmid: int, name: str, address: str, firewall: bool = False) -> None:
        if firewall:
            self.firewall(vmid)
        r = subprocess.run(["ip", "netns", "exec", self.ns, *self.argv(vmid, name, address)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"kvm {vmid}: {r.stderr.strip()}")
        self.vmids.append(vmid)

    def pid(self, vmid: int) -> int | None:
        try:
            return int((self.root / f"{vmid}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self, vmid: int) -> None:
        pid = self.pid(vmid)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait_ping(self, address: str, timeout: float = 90) -> float:
        t0 = time.monotonic()
        while self.run("ping", "-c", "1", "-W", "1", address).returncode != 0:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{address} never answered ping")
        return time.monotonic() - t0

    def close(self) -> None:
        for vmid in self.vmids:
            self.kill(vmid)
        delete_netns(self.ns)
        shutil.rmtree(self.root, ignore_errors=True)
