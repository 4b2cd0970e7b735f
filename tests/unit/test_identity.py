"""Guest identity from QEMU command lines, tun fdinfo, libvirt domain XML and the lab file (pure parsing)."""
import os
from types import SimpleNamespace

from kvmnet.exporter.sources.identity import (
    GuestDirectory,
    GuestIdentity,
    Netdev,
    libvirt_state,
    parse_cmdline,
    parse_domain_xml,
    parse_fdinfo,
    parse_opts,
    qmp_socket,
    qmp_state,
    resolve_taps,
    shutoff_reason,
)

# The seed's own command line (DESIGN.md): a tap named on the command line, the MAC on the -device.
SEED = ["qemu-system-x86_64", "-name", "vm1", "-m", "512", "-drive", "file=debian-8.7.1-amd64.img,if=virtio",
        "-netdev", "tap,id=hn0,ifname=vm1eth0,script=/etc/ifup,downscript=/etc/ifdown",
        "-device", "virtio-net-pci,netdev=hn0,mac=0A:E8:4F:C5:6A:16", "-nographic"]

# libvirt 9.x (JSON -netdev/-device, the tap opened by libvirtd and passed as fd 32).
LIBVIRT_JSON = [
    "/usr/bin/qemu-system-x86_64", "-name", "guest=debian12,debug-threads=on", "-S",
    "-object", '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/master-key.aes"}',
    "-machine", "pc-q35-8.2,usb=off,vmport=off,dump-guest-core=off,memory-backend=pc.ram,hpet=off,acpi=on",
    "-accel", "kvm", "-m", "size=2097152k", "-uuid", "0b6b8a4e-6d0d-4c36-9b8a-3a1e5c0e8f11",
    "-chardev", "socket,id=charmonitor,fd=30,server=on,wait=off",
    "-device", '{"driver":"pcie-root-port","port":16,"chassis":1,"id":"pci.1","bus":"pcie.0","addr":"0x2"}',
    "-netdev", '{"type":"tap","fd":"32","vhost":true,"vhostfd":"34","id":"hostnet0"}',
    "-device", '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:6b:3c:58","bus":"pci.1"}',
    "-netdev", '{"type":"tap","fds":"35:36","vhost":true,"vhostfds":"37:38","id":"hostnet1"}',
    "-device", '{"driver":"virtio-net-pci","mq":true,"vectors":6,"netdev":"hostnet1","id":"net1","mac":"52:54:00:00:00:02"}',
    "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
]

# libvirt 4.x-6.x (QemuOpts syntax; `,,` escapes a comma in the name).
LIBVIRT_OLD = [
    "/usr/libexec/qemu-kvm", "-name", "guest=web,,01,debug-threads=on", "-machine", "pc-i440fx-rhel7.6.0",
    "-netdev", "tap,fd=26,id=hostnet0,vhost=on,vhostfd=28",
    "-device", "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:aa:bb:cc,bus=pci.0,addr=0x3",
]

FDINFO = {32: "pos:\t0\nflags:\t0104002\nmnt_id:\t25\nino:\t1049\niff:\tvnet0\n",
          35: "pos:\t0\nflags:\t0104002\nmnt_id:\t25\nino:\t1050\niff:\tvnet1\n",
          36: "pos:\t0\nflags:\t0104002\nmnt_id:\t25\nino:\t1051\niff:\tvnet1\n",
          26: "pos:\t0\nflags:\t02\nmnt_id:\t25\niff:\tvnet7\n"}


def fdinfo(fd):
    return parse_fdinfo(FDINFO.get(fd, "pos:\t0\nflags:\t02\n"))


def test_parse_opts():
    assert parse_opts("tap,id=n0,ifname=vm1eth0", "type") == {"type": "tap", "id": "n0", "ifname": "vm1eth0"}
    assert parse_opts("guest=a,,b,debug-threads=on", "guest") == {"guest": "a,b", "debug-threads": "on"}
    assert parse_opts("vm1", "guest") == {"guest": "vm1"}
    assert parse_opts('{"type":"tap","fd":"3","vhost":true}', "type") == {"type": "tap", "fd": "3", "vhost": "on"}
    assert parse_opts("{not json", "type") == {}


def test_seed_cmdline():
    a = parse_cmdline(SEED)
    assert a.name == "vm1"
    assert a.netdevs == [Netdev(id="hn0", type="tap", ifname="vm1eth0", mac="0a:e8:4f:c5:6a:16")]
    assert resolve_taps(a, fdinfo, lambda: []) == {"vm1eth0": GuestIdentity("vm1", "0a:e8:4f:c5:6a:16", "qemu")}


def test_libvirt_json_cmdline_through_fdinfo():
    a = parse_cmdline(LIBVIRT_JSON)
    assert a.name == "debian12"
    assert [(n.id, n.fds, n.mac) for n in a.netdevs] == [("hostnet0", [32], "52:54:00:6b:3c:58"),
                                                        ("hostnet1", [35, 36], "52:54:00:00:00:02")]
    assert resolve_taps(a, fdinfo, lambda: []) == {
        "vnet0": GuestIdentity("debian12", "52:54:00:6b:3c:58", "qemu"),
        "vnet1": GuestIdentity("debian12", "52:54:00:00:00:02", "qemu")}


def test_libvirt_old_cmdline():
    a = parse_cmdline(LIBVIRT_OLD)
    assert a.name == "web,01"
    assert resolve_taps(a, fdinfo, lambda: []) == {"vnet7": GuestIdentity("web,01", "52:54:00:aa:bb:cc", "qemu")}


def test_name_with_process_and_double_dash_options():
    a = parse_cmdline(["qemu-system-aarch64", "--name", "vm9,process=qemu-vm9", "--netdev",
                       "type=tap,id=x,ifname=t9", "--device", "virtio-net-device,netdev=x,mac=02:00:00:00:00:09"])
    assert a.name == "vm9"
    assert resolve_taps(a, fdinfo, lambda: []) == {"t9": GuestIdentity("vm9", "02:00:00:00:00:09", "qemu")}


def test_nic_and_legacy_net():
    a = parse_cmdline(["qemu-system-x86_64", "-name", "n", "-nic", "tap,ifname=n0,mac=02:00:00:00:00:01,model=e1000"])
    assert resolve_taps(a, fdinfo, lambda: []) == {"n0": GuestIdentity("n", "02:00:00:00:00:01", "qemu")}
    a = parse_cmdline(["qemu-system-x86_64", "-name", "old", "-net", "nic,macaddr=02:00:00:00:00:0a,model=virtio",
                       "-net", "tap,ifname=old0,script=no"])
    assert resolve_taps(a, fdinfo, lambda: []) == {"old0": GuestIdentity("old", "02:00:00:00:00:0a", "qemu")}


def test_unnamed_taps_found_by_scanning_tun_fds():
    # -netdev bridge (qemu-bridge-helper opens tapN) and an ifname template: the command line names no tap.
    a = parse_cmdline(["qemu-system-x86_64", "-name", "h", "-netdev", "bridge,id=b0,br=br0",
                       "-device", "e1000,netdev=b0,mac=02:00:00:00:00:b0",
                       "-netdev", "tap,id=t1,ifname=tap%d", "-device", "e1000,netdev=t1,mac=02:00:00:00:00:b1"])
    info = {9: "iff:\ttap0\n", 11: "iff:\ttap1\n", 4: "pos:\t0\n"}
    got = resolve_taps(a, lambda fd: parse_fdinfo(info.get(fd, "")), lambda: [11, 4, 9])
    assert got == {"tap0": GuestIdentity("h", "02:00:00:00:00:b0", "qemu"),
                   "tap1": GuestIdentity("h", "02:00:00:00:00:b1", "qemu")}


def test_non_tap_netdevs_ignored():
    a = parse_cmdline(["qemu-system-x86_64", "-name", "u", "-netdev", "user,id=u0", "-device", "e1000,netdev=u0",
                       "-netdev", "vhost-user,id=v0,chardev=c0"])
    assert a.netdevs == []
    assert parse_cmdline(["qemu-system-x86_64"]).name == ""
    assert parse_cmdline(["qemu-system-x86_64", "-name"]).name == ""  # truncated argv does not crash


def test_fdinfo():
    assert parse_fdinfo(FDINFO[32]) == "vnet0"
    assert parse_fdinfo("pos:\t0\nflags:\t02\n") is None  # a tun fd not attached to any device
    assert parse_fdinfo("") is None


DOMSTATUS = """<domstatus state='running' reason='booted' pid='4242'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-3-web01/monitor.sock' type='unix'/>
  <domain type='kvm' id='3'>
    <name>web01</name>
    <uuid>0b6b8a4e-6d0d-4c36-9b8a-3a1e5c0e8f11</uuid>
    <devices>
      <interface type='bridge'>
        <mac address='52:54:00:AA:BB:01'/>
        <source bridge='br0'/>
        <target dev='vnet3'/>
        <model type='virtio'/>
      </interface>
      <interface type='network'>
        <mac address='52:54:00:aa:bb:02'/>
        <source network='default' bridge='virbr0'/>
        <target dev='vnet4'/>
      </interface>
      <interface type='user'><mac address='52:54:00:aa:bb:03'/></interface>
    </devices>
  </domain>
</domstatus>"""


def test_domain_xml():
    d = parse_domain_xml(DOMSTATUS)
    assert d.name == "web01" and d.pid == 4242
    assert d.interfaces == [("vnet3", "52:54:00:aa:bb:01"), ("vnet4", "52:54:00:aa:bb:02")]
    plain = parse_domain_xml("<domain><name>x</name><devices><interface><target dev='t'/></interface></devices></domain>")
    assert plain == ("x", None, [("t", "")], "", "")
    assert (d.state, d.reason) == ("running", "booted")
    paused = parse_domain_xml(DOMSTATUS.replace("state='running' reason='booted'", "state='paused' reason='user'"))
    assert (paused.state, paused.reason) == ("paused", "user")


def test_states_and_reasons():
    assert libvirt_state("paused") == "paused" and libvirt_state("nostate") == "unknown"
    assert libvirt_state("bogus") == "unknown"
    assert qmp_state("running") == "running" and qmp_state("suspended") == "pmsuspended"
    assert qmp_state("guest-panicked") == "crashed" and qmp_state("prelaunch") == "paused"
    log = ("2026-12-01 11:00:00.000+0000: starting up libvirt version: 9.0.0\n"
           "2026-12-01 11:01:00.000+0000: shutting down, reason=crashed\n"
           "2026-12-01 11:02:00.000+0000: starting up\n"
           "2026-12-01 11:03:00.000+0000: shutting down, reason=destroyed\n")
    assert shutoff_reason(log) == "destroyed"
    assert shutoff_reason("") == ""
    assert qmp_socket(["qemu-system-x86_64", "-qmp", "unix:/run/kvmnet/l/guests/vm1.qmp,server=on,wait=off"]) == \
        "/run/kvmnet/l/guests/vm1.qmp"
    assert qmp_socket(["qemu-system-x86_64", "-qmp", "tcp:127.0.0.1:4444"]) == ""
    pve = ["/usr/bin/kvm", "-id", "100", "-name", "web01,debug-threads=on", "-chardev",
           "socket,id=qmp,path=/var/run/qemu-server/100.qmp,server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
    assert qmp_socket(pve) == "/var/run/qemu-server/100.qmp"
    lv = ["qemu-system-x86_64", "-name", "guest=web,debug-threads=on", "-chardev",
          "socket,id=charmonitor,fd=30,server=on,wait=off", "-mon", "chardev=charmonitor,id=monitor,mode=control"]
    assert qmp_socket(lv) == ""
    assert parse_domain_xml("<not-xml") is None
    assert parse_domain_xml("<other/>") is None


def _fake_proc(tmp_path, pid, argv, fdinfo=None):
    d = tmp_path / "proc" / str(pid)
    (d / "fdinfo").mkdir(parents=True)
    (d / "fd").mkdir()
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "ns").mkdir()
    os.symlink("/proc/self/ns/net", d / "ns" / "net")  # the exporter's own namespace
    for fd, text in (fdinfo or {}).items():
        (d / "fdinfo" / str(fd)).write_text(text)


def test_directory_merges_sources_in_own_namespace(tmp_path):
    """A fixture /proc tree (the QEMU 'runs' in our own namespace) plus libvirt XML and a lab: live QEMU wins."""
    _fake_proc(tmp_path, 100, SEED)
    _fake_proc(tmp_path, 101, LIBVIRT_OLD, {26: FDINFO[26]})
    _fake_proc(tmp_path, 102, ["bash", "-c", "qemu-system-x86_64 -name fake"])
    (tmp_path / "proc" / "self").symlink_to("100")
    lv = tmp_path / "libvirt"
    lv.mkdir()
    (lv / "web01.xml").write_text(DOMSTATUS.replace("pid='4242'", ""))
    lab = SimpleNamespace(host_netns="", guests=[
        SimpleNamespace(name="vm1-lab", device="vm1eth0", mac="0a:e8:4f:c5:6a:16"),
        SimpleNamespace(name="vm2", device="vm2eth0", mac="0A:00:00:00:00:02"),
        SimpleNamespace(name="lab-web", device="vnet3", mac="")])
    d = GuestDirectory(lab=lab, proc=str(tmp_path / "proc"), libvirt_dir=str(lv))
    got = d.lookup("")
    assert got == {
        "vm1eth0": GuestIdentity("vm1", "0a:e8:4f:c5:6a:16", "qemu"),
        "vnet7": GuestIdentity("web,01", "52:54:00:aa:bb:cc", "qemu"),
        "vm2eth0": GuestIdentity("vm2", "0a:00:00:00:00:02", "lab"),
        "vnet3": GuestIdentity("web01", "52:54:00:aa:bb:01", "libvirt"),
        "vnet4": GuestIdentity("web01", "52:54:00:aa:bb:02", "libvirt"),
    }
    assert d.lookup("ke-no-such-namespace") == {}


def test_never_empty_never_shared(tmp_path):
    """The seed's QEMU without -name is called after its tap; two QEMUs with one -name are told apart by theirs."""
    nameless = [a for a in SEED if a not in ("-name", "vm1")]
    _fake_proc(tmp_path, 200, nameless)
    _fake_proc(tmp_path, 201, ["qemu-system-x86_64", "-name", "twin", "-netdev", "tap,id=n0,ifname=tw1",
                               "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01"])
    _fake_proc(tmp_path, 202, ["qemu-system-x86_64", "-name", "twin", "-netdev", "tap,id=n0,ifname=tw2",
                               "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:02"])
    (tmp_path / "proc" / "self").symlink_to("200")
    d = GuestDirectory(proc=str(tmp_path / "proc"), libvirt_dir=str(tmp_path / "none"))
    got = {dev: i.name for dev, i in d.lookup("").items()}
    assert got == {"vm1eth0": "vm1eth0", "tw1": "tw1", "tw2": "tw2"}
