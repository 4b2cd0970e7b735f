"""QEMU guests of a lab: the glue between `up`/`down`/`status` and setup/qemu.py (command line, QMP, accel) and
setup/image.py (the tiny guest). QEMU runs inside the lab's host namespace, where its tap is, and reaches the
bridge through kvmnet-ifup / kvmnet-ifdown as its script= / downscript=, as in the seed.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from kvmnet.exporter.sources.netns import entered

from .spec import Guest, Lab, resolve_image


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
    from . import qemu
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accel = g.accel if g.accel != "auto" else qemu.detect_accel()
    disk = resolve_image(lab, g)
    tap = lab.tap(g.tap)
    # The hooks find the bridge from taps.json; KVMNET_BRIDGE makes it certain for this QEMU's own hook calls.
    env = dict(os.environ, KVMNET_BRIDGE=g.bridge, KVMNET_LAB=lab.name)
    with entered(lab.host_netns):  # fork() copies this thread's namespace: QEMU starts inside the lab's host
        return qemu.start(g, tap=g.tap, mac=g.mac, ifup=hook("kvmnet-ifup"), ifdown=hook("kvmnet-ifdown"),
                          run_dir=run_dir, accel=accel, disk=disk, multi_queue=tap.multi_queue,
                          vnet_hdr=tap.vnet_hdr, env=env, progress=progress)


def stop(run_dir: str | Path, ns: str = "") -> None:
    from . import qemu
    with entered(ns if ns and os.path.exists(f"/run/netns/{ns}") else ""):
        qemu.stop(Path(run_dir))


def status(run_dir: Path) -> dict:
    """{"running": bool, "detail": str}: the QMP answer when QEMU is alive."""
    from . import qemu
    try:
        st = qemu.status(Path(run_dir))
    except Exception as e:  # status must show the lab even when one guest is odd
        return {"running": False, "detail": f"error: {e}"}
    return {"running": bool(st.get("running")), "detail": st.get("detail") or st.get("status") or ""}
