"""Helpers for tests that run the real kvmnet-setup on uniquely named labs (never the demo's seed-host/seed-lan)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import delete_netns, unique_name

RUN_DIR = Path(os.environ.get("KVMNET_RUN_DIR", "/run/kvmnet"))
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def cli(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI as a subprocess: what a user runs."""
    p = subprocess.run([sys.executable, "-m", "kvmnet.setup.cli", *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"kvmnet-setup {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def start_cli(*args: str, hook: str | None = None) -> subprocess.Popen:
    """The real CLI in the background; `hook` sets KVMNET_TEST_HOOK (setup/state.py: kill -9 or stop it midway)."""
    env = dict(os.environ, **({"KVMNET_TEST_HOOK": hook} if hook else {}))
    return subprocess.Popen([sys.executable, "-m", "kvmnet.setup.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_stopped(p: subprocess.Popen, timeout: float = 60) -> None:
    """Until the process has stopped itself (SIGSTOP from its test hook); fails if it exits instead."""
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if p.poll() is not None:
            raise AssertionError(f"exited {p.returncode} before the hook: {p.stderr.read()}")
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.02)
    raise AssertionError("the hook never stopped it")


def netns_list() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


class Labs:
    """Writes lab files with unique lab/namespace names; tears everything down afterwards, even on failure."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.files: list[Path] = []
        self.names: set[str] = set()    # lab names (state dirs)
        self.netns: set[str] = set()    # every namespace a lab may create

    def write(self, data: dict, path: Path | None = None) -> Path:
        path = path or self.tmp / f"{data['name']}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        if path not in self.files:
            self.files.append(path)
        return path

    def make(self, data: dict) -> tuple[Path, dict]:
        """Rename the lab, its namespaces and its light guests' namespaces uniquely; write it."""
        d = copy.deepcopy(data)
        tag = unique_name("ks")
        d["name"] = tag
        ns = d.get("namespaces") or {}
        for role in ("host", "lan"):
            if ns.get(role):
                ns[role] = f"{tag}-{role}"
        for g in d.get("guests", []):
            if g.get("kind") == "netns":
                g["netns"] = f"{tag}-{g['name']}"
        self.names.add(tag)
        self.netns |= {v for v in ns.values() if v} | {g["netns"] for g in d.get("guests", []) if g.get("netns")}
        return self.write(d), d

    def seed(self, **overrides) -> tuple[Path, dict]:
        d = yaml.safe_load((EXAMPLES / "seed-lab.yaml").read_text())
        d.update(overrides)
        return self.make(d)

    def cleanup(self) -> None:
        for f in self.files:
            if f.exists():
                cli("down", "-c", str(f))
        for name in self.netns:
            if name in netns_list():
                delete_netns(name)
        for name in self.names:
            shutil.rmtree(RUN_DIR / name, ignore_errors=True)


def links_json(netns: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", netns, "-d", "-j", "addr", "show"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def addrs(netns: str, dev: str) -> list[str]:
    for l in links_json(netns):
        if l["ifname"] == dev:
            return [f"{a['local']}/{a['prefixlen']}" for a in l.get("addr_info", []) if a.get("scope") != "link"]
    raise KeyError(dev)


def ping(netns: str, ip: str, timeout: float = 10.0) -> None:
    """Ping until one answer (ports need a moment to reach forwarding on a loaded machine); raise if none."""
    import time
    end = time.monotonic() + timeout
    while True:
        p = subprocess.run(["ip", "netns", "exec", netns, "ping", "-c1", "-W1", ip], capture_output=True, text=True)
        if p.returncode == 0:
            return
        if time.monotonic() > end:
            raise AssertionError(f"{ip} does not answer from {netns}: {p.stdout.strip().splitlines()[-1:]}")
