"""QEMU guests of a lab: the glue between `up`/`down`/`status` and setup/qemu.py (command line, QMP, accel) and
setup/image.py (the tiny guest). QEMU runs inside the lab's host namespace, where its tap is, and reaches the
bridge through kvmnet-ifup / kvmnet-ifdown as its script= / downscript=, as in the seed.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from kvmnet.common.lab import Guest, Lab, resolve_image


def hook(name: str) -> str:
    """Absolute path of kvmnet-ifup/-ifdown: next to this interpreter (a venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH (is kvmnet installed?)")
    return found


def start(lab: Lab, g: Guest, run_dir: Path, progress=lambda s: None) -> int:
    """Start g's QEMU (daemonized) in the lab's host namespace; returns its pid. QEMU's own error is raised as
    qemu.QemuError with one line."""
    from . import image, qemu
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accel = qemu.resolve_accel(g.accel)
    tap = lab.tap(g.tap)
    disk = resolve_image(lab, g)
    boot: dict = {}
    if disk is not None:
        boot = {"disk": disk, "disk_format": qemu.disk_format(disk)}
    else:
        img = image.ensure_image(progress=progress)
        boot = {"kernel": img.kernel, "initrd": img.initrd,
                "append": qemu.guest_append(str(g.address), str(g.gateway) if g.gateway else None, g.name)}
    argv = qemu.build_command(name=g.name, tap=g.tap, mac=g.mac, run_dir=run_dir, accel=accel, memory=g.memory,
                              cpus=g.cpus, ifup=hook("kvmnet-ifup"), ifdown=hook("kvmnet-ifdown"),
                              multi_queue=tap.multi_queue, vnet_hdr=tap.vnet_hdr, **boot)
    progress(f"starting QEMU guest {g.name} ({accel}) on {g.tap}")
    # As in the seed, QEMU calls the hook with only the tap's name; kvmnet-ifup finds the bridge in taps.json
    # (written by `up` before any guest starts), so that lookup is what every lab guest exercises.
    # ($KVMNET_BRIDGE, if the user exported it, still overrides: it is the hooks' documented manual knob.)
    return qemu.start(argv, netns=lab.host_netns)


def alive(run_dir: str | Path, name: str) -> bool:
    from . import qemu
    return qemu.find_pid(run_dir, name) is not None  # also one still starting, from an `up` killed meanwhile


def stop(run_dir: str | Path, name: str, start: int | None = None) -> str:
    from . import qemu
    # powerdown=False: the tiny guest has nothing to flush, and `down` of many guests should not wait on ACPI.
    return qemu.stop(run_dir, name, powerdown=False, start=start)


def status(run_dir: Path, name: str) -> dict:
    """{"running": bool, "detail": str}: QMP's query-status when QEMU is alive."""
    from . import qemu
    try:
        st = qemu.status(run_dir, name)
    except Exception as e:  # status must show the lab even when one guest is odd
        return {"running": False, "detail": f"error: {e}"}
    return {"running": bool(st.get("alive")), "detail": f"pid {st['pid']} qmp {st['status']}" if st.get("alive")
            else st.get("status", "")}
