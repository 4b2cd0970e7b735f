"""One real tiny guest under TCG on a tap in a bridge, in a namespace of its own: the seed's Bridge mode at its
smallest. QEMU calls kvmnet-ifup/kvmnet-ifdown as script=/downscript=, as lab guests do. The witnesses are ping,
`bridge -j fdb` (the guest's MAC learned on its tap), `ip -j link` and /proc, never kvmnet's own code.

    .venv/bin/python -m pytest -s tests/e2e/test_guest_boot.py     # -s shows the boot progress and time
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmnet.setup import image, qemu
from tests import witness
from tests.conftest import unique_name

pytestmark = pytest.mark.qemu

BRIDGE_ADDR = "192.168.98.100/24"
GUEST_ADDR = "192.168.98.11/24"


def hook(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name) or pytest.skip(f"{name} is not installed")


def qemu_alive(marker: str) -> list[int]:
    """Live (not zombie) QEMU processes whose command line contains marker: the witness reads /proc itself."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"qemu-system" in cmd and marker.encode() in cmd and state != "Z":
            out.append(int(pid))
    return out


@pytest.fixture(scope="module")
def guest_image() -> image.GuestImage:
    return image.ensure_image(progress=print)


@pytest.fixture
def lab(netns_factory, tmp_path):
    """A namespace with br0 (192.168.98.100/24) and a run dir; any QEMU started under it is killed afterwards."""
    ns = netns_factory("kqe")
    witness.run(ns, "ip", "link", "add", "br0", "type", "bridge")
    witness.run(ns, "ip", "addr", "add", BRIDGE_ADDR, "dev", "br0")
    witness.run(ns, "ip", "link", "set", "br0", "up")
    run_dir = tmp_path / "run"
    # The downscript's proof of life: a wrapper that records its call, then runs the real hook.
    marker = tmp_path / "ifdown.calls"
    ifdown = tmp_path / "ifdown"
    ifdown.write_text(f'#!/bin/sh\necho "$1" >> {marker}\nexec {hook("kvmnet-ifdown")} "$1"\n')
    ifdown.chmod(ifdown.stat().st_mode | stat.S_IXUSR)
    yield {"ns": ns, "run_dir": run_dir, "ifdown": str(ifdown), "marker": marker}
    for pid in qemu_alive(str(run_dir)):
        os.kill(pid, signal.SIGKILL)


def boot(lab: dict, img: image.GuestImage, name: str, tap: str, mac: str, **kw) -> list[str]:
    return qemu.build_command(name=name, tap=tap, mac=mac, run_dir=lab["run_dir"], accel="tcg",
                              kernel=img.kernel, initrd=img.initrd, append=qemu.guest_append(GUEST_ADDR, None, name),
                              ifup=hook("kvmnet-ifup"), ifdown=lab["ifdown"], **kw)


def test_tiny_guest_boots_answers_ping_and_stops_cleanly(lab, guest_image):
    ns, run_dir = lab["ns"], lab["run_dir"]
    name, tap, mac = unique_name("kqg"), unique_name("kqt"), "0a:e8:4f:c5:6a:16"
    argv = boot(lab, guest_image, name, tap, mac)

    t0 = time.monotonic()
    pid = qemu.start(argv, netns=ns, env={"KVMNET_BRIDGE": "br0"})
    started = time.monotonic() - t0
    # -daemonize returns after ifup: the tap is already a port of br0.
    assert witness.bridge_ports(ns)[tap]["master"] == "br0"
    assert qemu_alive(str(run_dir)) == [pid]
    assert qemu.status(run_dir, name) == {"name": name, "pid": pid, "alive": True, "status": "running"}

    qemu.wait_for_ping(ns, GUEST_ADDR, timeout=90, name=name)
    first_ping = time.monotonic() - t0
    print(f"\nguest {name}: QEMU started in {started:.2f}s, first ping answered {first_ping:.1f}s after start (TCG)")
    assert witness.run(ns, "ping", "-c3", "-i0.2", "-W1", GUEST_ADDR.split("/")[0], check=False).returncode == 0

    learned = [e for e in witness.fdb(ns) if e.get("mac") == mac]
    assert learned and learned[0]["ifname"] == tap and learned[0].get("master") == "br0", learned
    assert "permanent" not in learned[0].get("state", ""), "learned, not a static entry"

    # Paused over QMP, status() says so. (QEMU's QMP socket serves one client at a time: close before asking.)
    with qemu.QMP(run_dir / f"{name}.qmp") as q:
        q.execute("stop")
    assert qemu.status(run_dir, name)["status"] == "paused"
    with qemu.QMP(run_dir / f"{name}.qmp") as q:
        q.execute("cont")
    assert qemu.status(run_dir, name)["status"] == "running"

    t1 = time.monotonic()
    how = qemu.stop(run_dir, name, timeout=20)
    print(f"guest {name}: stopped by {how} in {time.monotonic() - t1:.2f}s")
    assert how == "powerdown", "the tiny guest powers off on the ACPI button"
    assert qemu_alive(str(run_dir)) == []
    assert tap not in witness.links(ns)
    assert lab["marker"].read_text().split() == [tap], "QEMU ran its downscript"
    assert "reboot: Power down" in (run_dir / f"{name}.log").read_text()
    assert qemu.status(run_dir, name)["status"] == "stopped"
    assert not (run_dir / f"{name}.qmp").exists() and not (run_dir / f"{name}.pid").exists()


def test_stop_without_powerdown_quits_and_runs_downscript(lab, guest_image):
    ns, run_dir = lab["ns"], lab["run_dir"]
    name, tap = unique_name("kqg"), unique_name("kqt")
    qemu.start(boot(lab, guest_image, name, tap, "0a:00:00:00:00:02"), netns=ns, env={"KVMNET_BRIDGE": "br0"})
    assert qemu.stop(run_dir, name, timeout=8, powerdown=False) == "quit"
    assert qemu_alive(str(run_dir)) == [] and tap not in witness.links(ns)
    assert lab["marker"].read_text().split() == [tap]


def test_kill_fallback_when_qmp_is_gone(lab, guest_image):
    """A guest whose QMP socket vanished is still stopped (SIGTERM: QEMU's clean exit, downscript included)."""
    ns, run_dir = lab["ns"], lab["run_dir"]
    name, tap = unique_name("kqg"), unique_name("kqt")
    qemu.start(boot(lab, guest_image, name, tap, "0a:00:00:00:00:03"), netns=ns, env={"KVMNET_BRIDGE": "br0"})
    (run_dir / f"{name}.qmp").unlink()
    assert qemu.status(run_dir, name)["status"] == "unknown"
    assert qemu.stop(run_dir, name, timeout=4) == "sigterm"
    assert qemu_alive(str(run_dir)) == [] and tap not in witness.links(ns)
    assert lab["marker"].read_text().split() == [tap]


def test_refused_start_is_one_line_and_leaves_nothing(lab, guest_image):
    """ifup fails (no such bridge): QEMU refuses to start, and neither QEMU nor the tap remains."""
    ns, run_dir = lab["ns"], lab["run_dir"]
    name, tap = unique_name("kqg"), unique_name("kqt")
    with pytest.raises(qemu.QemuError) as e:
        qemu.start(boot(lab, guest_image, name, tap, "0a:00:00:00:00:04"), netns=ns,
                   env={"KVMNET_BRIDGE": "nosuchbr"})
    assert "\n" not in str(e.value) and "no bridge 'nosuchbr'" in str(e.value), str(e.value)
    assert qemu_alive(str(run_dir)) == [] and tap not in witness.links(ns)


def test_accel_detection():
    """The probe answers, and says why; on a plain TCG run it must say yes, so a "tcg" here is not the probe's fault."""
    accel = qemu.detect_accel()
    print(f"\ndetect_accel: {accel} ({qemu.accel_reason()})")
    assert accel in ("kvm", "tcg") and qemu.accel_reason()
    ok, why = qemu._probe_kvm(accel="tcg", cpu="qemu64", timeout=60)
    assert ok, why


def test_image_builds_in_a_fresh_cache_and_is_reused(tmp_path, monkeypatch):
    """The real build (apt-get download, dpkg-deb -x, pack) into an empty cache, with progress; then a cache hit."""
    monkeypatch.setenv("KVMNET_CACHE_DIR", str(tmp_path))
    lines: list[str] = []
    img = image.ensure_image(progress=lines.append)
    assert [l.split()[1] for l in lines] == ["downloading", "extracting", "packing", "ready"], lines
    assert img.kernel.stat().st_size > 1_000_000 and img.initrd.stat().st_size > 500_000
    assert img.kernel.parent.parent == tmp_path / "guest"
    assert list((tmp_path / "guest").glob("build-*")) == [], "no half-built directory left"
    lines.clear()
    assert image.ensure_image(progress=lines.append) == img and lines == []


def test_disk_image_guest_like_the_seeds(lab, tmp_path):
    """The seed's shape: a qcow2 disk on virtio-blk (an empty one: no OS boots, QEMU still runs), here with a
    multi-queue tap without vnet_hdr. QEMU itself confirms the disk and MAC; iproute2 confirms the tap flags."""
    ns, run_dir = lab["ns"], lab["run_dir"]
    name, tap, mac = unique_name("kqg"), unique_name("kqt"), "0a:e8:4f:c5:6a:1d"
    disk = tmp_path / "debian-8.7.1-amd64.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    argv = qemu.build_command(name=name, tap=tap, mac=mac, run_dir=run_dir, accel="tcg", memory="512M", cpus=2,
                              disk=disk, disk_format=qemu.disk_format(disk), multi_queue=True, vnet_hdr=False,
                              ifup=hook("kvmnet-ifup"), ifdown=lab["ifdown"])
    qemu.start(argv, netns=ns, env={"KVMNET_BRIDGE": "br0"})
    with qemu.QMP(run_dir / f"{name}.qmp") as q:
        blocks = {b["device"]: b for b in q.execute("query-block")}
        assert blocks["disk0"]["inserted"]["drv"] == "qcow2" and blocks["disk0"]["inserted"]["file"] == str(disk)
        assert "virtio-disk0" in blocks["disk0"]["qdev"]
        assert q.execute("query-rx-filter", name="nic0")[0]["main-mac"] == mac
    info = witness.links(ns)[tap]["linkinfo"]["info_data"]
    assert info["type"] == "tap" and info["multi_queue"] is True and info["vnet_hdr"] is False, info
    assert witness.bridge_ports(ns)[tap]["master"] == "br0"
    # No OS to press the power button for: stop falls through to QMP quit, which still runs the downscript.
    assert qemu.stop(run_dir, name, timeout=2) == "quit"
    assert qemu_alive(str(run_dir)) == [] and tap not in witness.links(ns)
    assert lab["marker"].read_text().split() == [tap]
