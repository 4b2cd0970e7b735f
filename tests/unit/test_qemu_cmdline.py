"""QEMU command lines (golden), the tiny guest's kernel command line, the QMP client, and the initramfs layout.

Regenerate the golden file after an intended change of the command line:

    KVMNET_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_qemu_cmdline.py
"""
from __future__ import annotations

import gzip
import json
import lzma
import os
import shlex
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from kvmnet.setup import image, qemu

GOLDEN = Path(__file__).parent / "golden" / "qemu_cmdline.txt"
RUN = "/run/kvmnet/seed/guests"

# name -> build_command() keywords. The first two are the seed's guest: the tiny guest, and its qcow2 disk.
CASES = {
    "seed-vm1-tiny-tcg": dict(
        name="vm1", tap="vm1eth0", mac="0a:e8:4f:c5:6a:16", run_dir=RUN, accel="tcg",
        kernel="/var/cache/kvmnet/guest/K/vmlinuz", initrd="/var/cache/kvmnet/guest/K/initrd.gz",
        append=qemu.guest_append("192.168.98.11/24", None, "vm1"),
        ifup="/opt/kvmnet/bin/kvmnet-ifup", ifdown="/opt/kvmnet/bin/kvmnet-ifdown"),
    "seed-vm1-qcow2-kvm": dict(
        name="vm1", tap="vm1eth0", mac="0a:e8:4f:c5:6a:16", run_dir=RUN, accel="kvm", memory="512M", cpus=1,
        disk="/data/vm/debian-8.7.1-amd64.img", disk_format="qcow2", vhost=True,
        ifup="/data/vm/ifup", ifdown="/data/vm/ifdown"),
    "multiqueue-raw-novnethdr": dict(
        name="mq", tap="mqtap0", mac="0a:00:00:00:00:01", run_dir="/tmp/r", accel="tcg", memory="1G", cpus=4,
        disk="/images/guest disk,v2.raw", disk_format="raw", multi_queue=True, vnet_hdr=False),
}


def render(argv: list[str]) -> str:
    """One option and its value per line, shell-quoted: a readable diff, and pasteable into a shell."""
    lines, cur = [], [argv[0]]
    for a in argv[1:]:
        if a.startswith("-"):
            lines.append(cur)
            cur = []
        cur.append(a)
    lines.append(cur)
    return " \\\n    ".join(" ".join(shlex.quote(a) for a in line) for line in lines) + "\n"


def render_all() -> str:
    return "\n".join(f"# {name}\n" + render(qemu.build_command(**kw)) for name, kw in CASES.items())


def test_golden_command_lines():
    text = render_all()
    if os.environ.get("KVMNET_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "command lines changed; KVMNET_UPDATE_GOLDEN=1 regenerates the golden file"


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_seed_shape():
    argv = qemu.build_command(**CASES["seed-vm1-qcow2-kvm"])
    assert argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-name") == ["vm1"]
    (netdev,) = _opt(argv, "-netdev")
    assert netdev.startswith("tap,id=net0,ifname=vm1eth0,script=/data/vm/ifup,downscript=/data/vm/ifdown")
    assert "vhost=on" in netdev
    devices = _opt(argv, "-device")
    assert "virtio-net-pci,netdev=net0,id=nic0,mac=0a:e8:4f:c5:6a:16" in devices
    assert any(d.startswith("virtio-blk-pci,drive=disk0") for d in devices)
    assert _opt(argv, "-drive")[0].startswith("file=/data/vm/debian-8.7.1-amd64.img,if=none,")
    assert "format=qcow2" in _opt(argv, "-drive")[0]
    assert _opt(argv, "-cpu") == ["host"] and _opt(argv, "-accel") == ["kvm"]
    assert "-daemonize" in argv and _opt(argv, "-pidfile") == [f"{RUN}/vm1.pid"]
    assert _opt(argv, "-qmp") == [f"unix:{RUN}/vm1.qmp,server=on,wait=off"]
    assert _opt(argv, "-serial") == [f"file:{RUN}/vm1.log"]
    assert "-kernel" not in argv


def test_tiny_guest_shape():
    argv = qemu.build_command(**CASES["seed-vm1-tiny-tcg"])
    assert _opt(argv, "-accel") == ["tcg"] and "-cpu" not in argv
    assert "-drive" not in argv
    assert "kvmnet.ip=192.168.98.11/24" in _opt(argv, "-append")[0].split()
    assert "vhost=off" in _opt(argv, "-netdev")[0]


def test_multi_queue_needs_two_queues_even_with_one_cpu():
    kw = dict(CASES["multiqueue-raw-novnethdr"], cpus=1)
    argv = qemu.build_command(**kw)
    assert ",queues=2" in _opt(argv, "-netdev")[0]
    assert any(d.endswith(",mq=on,vectors=6") for d in _opt(argv, "-device"))
    assert "vnet_hdr=off" in _opt(argv, "-netdev")[0]


@pytest.mark.parametrize("bad", [dict(accel="auto"), dict(kernel=None), dict(disk="/x.img"),
                                 dict(run_dir="/run/" + "x" * 100)])
def test_bad_arguments(bad):
    kw = dict(CASES["seed-vm1-tiny-tcg"], **bad)
    with pytest.raises(ValueError):
        qemu.build_command(**kw)


def test_commas_in_paths_are_doubled():
    argv = qemu.build_command(**CASES["multiqueue-raw-novnethdr"])
    assert _opt(argv, "-drive")[0].startswith("file=/images/guest disk,,v2.raw,if=none,")


def test_guest_append():
    assert qemu.guest_append("10.0.0.2/24", "10.0.0.1", "g0").split()[-3:] == [
        "kvmnet.ip=10.0.0.2/24", "kvmnet.gw=10.0.0.1", "kvmnet.name=g0"]
    assert "kvmnet.ip" not in qemu.guest_append()


def test_disk_format(tmp_path):
    q = tmp_path / "a.img"
    q.write_bytes(b"QFI\xfb" + b"\0" * 100)
    r = tmp_path / "b.img"
    r.write_bytes(b"\0" * 512)
    assert qemu.disk_format(q) == "qcow2" and qemu.disk_format(r) == "raw"


def test_qmp_client_skips_events(tmp_path):
    """A scripted QMP peer: greeting, an event before the reply, then an error reply."""
    path = tmp_path / "q.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    seen = []

    def serve():
        conn, _ = srv.accept()
        f = conn.makefile("rwb")
        send = lambda o: (f.write(json.dumps(o).encode() + b"\n"), f.flush())
        send({"QMP": {"version": {}, "capabilities": []}})
        for reply in ([{"return": {}}], [{"event": "POWERDOWN"}, {"return": {"status": "running"}}],
                      [{"error": {"class": "GenericError", "desc": "nope"}}]):
            seen.append(json.loads(f.readline()))
            for r in reply:
                send(r)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with qemu.QMP(path) as q:
        assert q.execute("query-status") == {"status": "running"}
        with pytest.raises(qemu.QemuError, match="QMP bogus: nope"):
            q.execute("bogus", x=1)
    t.join(5)
    assert [m["execute"] for m in seen] == ["qmp_capabilities", "query-status", "bogus"]
    assert seen[2]["arguments"] == {"x": 1}


def test_status_of_a_guest_that_never_ran(tmp_path):
    assert qemu.status(tmp_path, "nope") == {"name": "nope", "pid": None, "alive": False, "status": "stopped"}
    assert qemu.stop(tmp_path, "nope") == "not running"


@pytest.mark.skipif(not image.BUSYBOX.exists(), reason="needs busybox-static")
def test_initramfs_layout(tmp_path):
    """Modules are decompressed and listed in load order; cpio(1) is the witness for the archive format."""
    moddir = tmp_path / "mods"
    mods = ["drivers/virtio/virtio_ring", "drivers/net/virtio_net"]
    (moddir / "kernel/drivers/virtio").mkdir(parents=True)
    (moddir / "kernel/drivers/net").mkdir(parents=True)
    (moddir / "kernel/drivers/virtio/virtio_ring.ko").write_bytes(b"RING")
    (moddir / "kernel/drivers/net/virtio_net.ko.xz").write_bytes(lzma.compress(b"NET", format=lzma.FORMAT_XZ))
    if shutil.which("zstd"):
        mods.append("drivers/block/virtio_blk")
        (moddir / "kernel/drivers/block").mkdir(parents=True)
        subprocess.run(["zstd", "-q", "-o", str(moddir / "kernel/drivers/block/virtio_blk.ko.zst")],
                       input=b"BLK", check=True)
    blob = gzip.decompress(image.build_initramfs(moddir, mods))
    assert blob == gzip.decompress(image.build_initramfs(moddir, mods)), "not deterministic"
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=blob, cwd=out, check=True)
    assert (out / "lib/modules/virtio_net.ko").read_bytes() == b"NET"
    assert (out / "lib/modules/virtio_ring.ko").read_bytes() == b"RING"
    assert (out / "etc/kvmnet-modules").read_text().split() == [m.rsplit("/", 1)[1] for m in mods]
    if "drivers/block/virtio_blk" in mods:
        assert (out / "lib/modules/virtio_blk.ko").read_bytes() == b"BLK"
    assert os.access(out / "init", os.X_OK) and (out / "bin/sh").is_symlink()
    assert (out / "dev/console").is_char_device()


def test_missing_module_is_one_line(tmp_path):
    with pytest.raises(image.ImageError, match=r"no module drivers/net/virtio_net\.ko"):
        image.build_initramfs(tmp_path, ["drivers/net/virtio_net"])


@pytest.mark.skipif(not image.BUSYBOX.exists(), reason="needs busybox-static")
def test_cache_key_follows_the_recipe(monkeypatch):
    """A changed /init (or module list) lands in a new cache directory, so it gets built."""
    before = image._recipe_hash()
    monkeypatch.setattr(image, "INIT", image.INIT + "# changed\n")
    assert image._recipe_hash() != before
    monkeypatch.setattr(image, "INIT", image.INIT.removesuffix("# changed\n"))
    assert image._recipe_hash() == before
    monkeypatch.setattr(image, "MODULES", image.MODULES[:-1])
    assert image._recipe_hash() != before


def test_start_error_is_one_line_naming_the_cause():
    out = ("kvmnet-ifup: kqtx: no bridge 'nobr' for kqtx in this namespace\n"
           "qemu-system-x86_64: -netdev tap,id=net0,ifname=kqtx,script=/x/kvmnet-ifup,downscript=no: "
           "network script /x/kvmnet-ifup failed with status 256\n")
    assert qemu._start_error(out) == ("network script /x/kvmnet-ifup failed with status 256 "
                                      "(kvmnet-ifup: kqtx: no bridge 'nobr' for kqtx in this namespace)")
    assert qemu._start_error("qemu-system-x86_64: -accel kvm: failed to initialize kvm: No such file\n") == \
        "failed to initialize kvm: No such file"
    assert qemu._start_error("") == "no message"
