"""A real libvirt host in miniature: Debian's libvirtd 9.0, inside a network namespace of its own, with guests that
boot kvmnet's tiny guest (direct kernel boot, TCG: `<domain type='qemu'>`).

    with LibvirtHost("kv") as h:                   # namespace kvXXXX, libvirtd, nothing of the system's touched
        h.bridge("kvbr0", "10.77.0.1/24")          # a plain Linux bridge for <interface type='bridge'>
        h.nat_network("kvnat", "kvvirbr1", "10.78.0.1/24")   # a libvirt NAT network: its bridge, dnsmasq, iptables
        h.direct_lower("kvlow0", "10.79.0.1/24")   # a veth to a peer namespace, for <interface type='direct'>
        h.define("web", h.iface_bridge("kvbr0", MAC), ip="10.77.0.11/24")
        h.virsh("start", "web")

Isolation (libvirt's default paths are fixed at build time for a root daemon, so they are replaced, not configured):
`ip netns exec NS` already gives the daemon a mount namespace of its own whose mounts do not propagate back. Inside
it a tmpfs covers /run (the host's /run, its dbus and netns, are out of sight: no systemd, no machined), and the
test's own directories are bind-mounted over /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
/var/log/libvirt. So the system's `default` network (in /etc/libvirt/qemu/networks/autostart) is never seen, let
alone autostarted, and nothing of this daemon outlives the namespace. From outside, the same files are under
`self.root` (`run/` is the daemon's /run/libvirt: `run/libvirt-sock`, `run/qemu/<dom>.xml`; `lib/dnsmasq/` holds
the leases). Through `/proc/<libvirtd pid>/root/run/libvirt/...` they are where a host would have them.

qemu.conf is the one DESIGN.md describes for libvirtd without systemd or a security module: QEMU runs as root, no
cgroups, no mount namespace per guest, the console to a file (no virtlogd).

Teardown, also after a failure: every domain destroyed and every network stopped (dnsmasq is stopped by libvirt),
libvirtd terminated by its PID, any process still in the namespace killed, the namespace and peer deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from kvmnet.setup import image
from tests.conftest import delete_netns, unique_name

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:stderr"
"""
DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt",
        "log": "/var/log/libvirt"}


class LibvirtHost:
    def __init__(self, prefix: str = "kv") -> None:
        self.ns = unique_name(prefix)
        self.peers: list[str] = []
        self.proc: subprocess.Popen | None = None
        # Short: the daemon's sockets live under it and sun_path holds 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix=f"{prefix}lv", dir="/tmp"))
        self.img = image.ensure_image(progress=lambda s: None)

    # -- the daemon ----------------------------------------------------------------------------------------------
    def __enter__(self) -> LibvirtHost:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.root}/run/libvirt-sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        for d in DIRS:
            (self.root / d).mkdir()
        for d in ("qemu/networks/autostart", "storage", "nwfilter"):
            (self.root / "etc" / d).mkdir(parents=True)
        (self.root / "etc/qemu.conf").write_text(QEMU_CONF)
        (self.root / "etc/libvirtd.conf").write_text(LIBVIRTD_CONF)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.ip("link", "set", "lo", "up")
        mounts = ["mount -t tmpfs kvmnet-test /run", "mkdir /run/libvirt"]
        mounts += [f"mount --bind {self.root / d} {target}" for d, target in DIRS.items()]
        script = " && ".join(mounts) + " && exec libvirtd -f /etc/libvirt/libvirtd.conf"
        self.log = open(self.root / "libvirtd.log", "w")
        # ip netns exec and sh both exec: the PID is libvirtd's.
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "sh", "-c", script],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not come up: {(self.root / 'libvirtd.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for dom in self.virsh("list", "--name", check=False).split():
                self.virsh("destroy", dom, check=False)
            for net in self.virsh("net-list", "--name", check=False).split():
                self.virsh("net-destroy", net, check=False)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        delete_netns(self.ns)  # kills what is left in it (a QEMU libvirt lost, dnsmasq), by PID
        for peer in self.peers:
            delete_netns(peer)
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------------------------
    def virsh(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def ip(self, *args: str, netns: str | None = None) -> None:
        subprocess.run(["ip", "-n", netns or self.ns, *args], check=True, capture_output=True)

    def run(self, *argv: str, netns: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", netns or self.ns, *argv], capture_output=True, text=True,
                              check=check)

    def status_xml(self, domain: str) -> Path:
        """libvirt's live status file for a running domain (its /run/libvirt/qemu/<name>.xml)."""
        return self.root / "run" / "qemu" / f"{domain}.xml"

    def leases(self, bridge: str) -> list[dict]:
        """dnsmasq's lease status file of a NAT network (written by libvirt's leaseshelper), by bridge name."""
        try:
            return json.loads((self.root / "lib" / "dnsmasq" / f"{bridge}.status").read_text() or "[]")
        except FileNotFoundError:
            return []

    # -- networks ------------------------------------------------------------------------------------------------
    def bridge(self, name: str, address: str) -> None:
        self.ip("link", "add", name, "type", "bridge")
        self.ip("addr", "add", address, "dev", name)
        self.ip("link", "set", name, "up")

    def nat_network(self, name: str, bridge: str, address: str, hosts: dict[str, str] | None = None) -> None:
        """A libvirt NAT network: libvirt makes the bridge, starts dnsmasq and installs iptables rules, all in
        this namespace. `hosts` = {mac: ip} fixed DHCP leases."""
        ip, plen = address.split("/")
        net = ".".join(ip.split(".")[:3])
        fixed = "".join(f"<host mac='{m}' ip='{a}'/>" for m, a in (hosts or {}).items())
        xml = (f"<network><name>{name}</name><forward mode='nat'/><bridge name='{bridge}' stp='on' delay='0'/>"
               f"<ip address='{ip}' prefix='{plen}'><dhcp><range start='{net}.100' end='{net}.199'/>{fixed}"
               f"</dhcp></ip></network>")
        path = self.root / f"net-{name}.xml"
        path.write_text(xml)
        self.virsh("net-define", str(path))
        self.virsh("net-start", name)

    def direct_lower(self, lower: str, address: str) -> str:
        """A veth `lower` in this namespace whose far end is in a peer namespace with `address`: the LAN a
        macvtap guest on `lower` is reached from (the host cannot reach a macvtap child through its lower
        device; see sibling())."""
        peer = unique_name(self.ns[:2] + "p")
        subprocess.run(["ip", "netns", "add", peer], check=True)
        self.peers.append(peer)
        self.ip("link", "set", "lo", "up", netns=peer)
        self.ip("link", "add", lower, "type", "veth", "peer", "name", "eth0", "netns", peer)
        self.ip("link", "set", lower, "up")
        self.ip("addr", "add", address, "dev", "eth0", netns=peer)
        self.ip("link", "set", "eth0", "up", netns=peer)
        return peer

    def sibling(self, name: str, lower: str, address: str) -> None:
        """A macvlan in bridge mode on `lower` with an address: how a host reaches its own macvtap guests."""
        self.ip("link", "add", name, "link", lower, "type", "macvlan", "mode", "bridge")
        self.ip("addr", "add", address, "dev", name)
        self.ip("link", "set", name, "up")

    # -- domains -------------------------------------------------------------------------------------------------
    @staticmethod
    def iface_bridge(bridge: str, mac: str, target: str | None = None) -> str:
        t = f"<target dev='{target}'/>" if target else ""
        return f"<interface type='bridge'><source bridge='{bridge}'/><mac address='{mac}'/>{t}" \
               f"<model type='virtio'/></interface>"

    @staticmethod
    def iface_network(network: str, mac: str) -> str:
        return f"<interface type='network'><source network='{network}'/><mac address='{mac}'/>" \
               f"<model type='virtio'/></interface>"

    @staticmethod
    def iface_direct(lower: str, mac: str, mode: str = "bridge", target: str | None = None) -> str:
        t = f"<target dev='{target}'/>" if target else ""
        return f"<interface type='direct'><source dev='{lower}' mode='{mode}'/><mac address='{mac}'/>{t}" \
               f"<model type='virtio'/></interface>"

    def define(self, name: str, iface: str, ip: str = "dhcp", gw: str | None = None) -> None:
        """A persistent domain booting the tiny guest; `ip` is ADDR/LEN or "dhcp" (busybox udhcpc)."""
        append = f"console=ttyS0 quiet panic=-1 kvmnet.ip={ip} kvmnet.name={name}"
        if gw:
            append += f" kvmnet.gw={gw}"
        xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{self.img.kernel}</kernel><initrd>{self.img.initrd}</initrd><cmdline>{append}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    {iface}
    <serial type='file'><source path='{self.root}/{name}.console'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""
        path = self.root / f"dom-{name}.xml"
        path.write_text(xml)
        self.virsh("define", str(path))

    def domifaddr_dev(self, domain: str) -> list[str]:
        """The host-side devices of a running domain's interfaces, as `virsh domiflist` names them."""
        out = []
        for line in self.virsh("domiflist", domain).splitlines():
            cols = line.split()
            if cols and cols[0] != "-":
                out.append(cols[0])
        return out

    def domifstat(self, domain: str, dev: str) -> dict[str, int]:
        """`virsh domifstat`: the guest's view (rx = what the guest received)."""
        out = {}
        for line in self.virsh("domifstat", domain, dev).splitlines():
            cols = line.split()
            if len(cols) == 3:
                out[cols[1]] = int(cols[2])
        return out

    def console(self, domain: str) -> str:
        try:
            return (self.root / f"{domain}.console").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ping(self, address: str, netns: str | None = None, timeout: float = 90) -> float:
        t0 = time.monotonic()
        while self.run("ping", "-c", "1", "-W", "1", address, netns=netns).returncode != 0:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{address} never answered ping from {netns or self.ns}")
        return time.monotonic() - t0


def qemu_pid(h: LibvirtHost, domain: str) -> int | None:
    """The running QEMU of a domain, from libvirt's own pid file."""
    try:
        return int((h.root / "run" / "qemu" / f"{domain}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
