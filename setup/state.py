"""What `up` created, recorded under /run/kvmnet/<lab>/, so `down` removes exactly that, even after the lab file
was edited, and leaves alone what was there before (a real host's uplink, a namespace someone else made).

    state.json  {"lab": NAME, "created": [ITEM, ...]}   items in creation order; `down` undoes them in reverse
    taps.json   {TAP: {"bridge": BR, "netns": NS}}       read by kvmnet-ifup, which QEMU calls with only the ifname

An ITEM is a dict with "op" and what undoing it needs:
    netns {name}  link {ns, name}  addr {ns, dev, address}  flushed {ns, dev, addresses, gateway}
    route {ns, gateway, dev}
    light {ns (guest's), name}  guest {name, ns, run_dir}  nat {ns, table}  sysctl {ns, key, old}
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kvmnet.common import netns as nsmod

RUN_DIR = Path(os.environ.get("KVMNET_RUN_DIR", "/run/kvmnet"))


def key(item: dict) -> tuple:
    """Items with the same key are the same object; recording one twice keeps the first (the creator)."""
    return tuple(sorted((k, str(v)) for k, v in item.items() if k not in ("addresses", "old", "run_dir")))


class State:
    def __init__(self, lab: str, root: Path | None = None):
        self.lab = lab
        self.dir = (root or RUN_DIR) / lab
        self.created: list[dict] = []
        self.taps: dict[str, dict] = {}
        self._keys: set[tuple] = set()
        self.load()

    @property
    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    def load(self) -> None:
        try:
            data = json.loads((self.dir / "state.json").read_text())
            self.created = data.get("created", [])
        except FileNotFoundError:
            self.created = []
        try:
            self.taps = json.loads((self.dir / "taps.json").read_text())
        except FileNotFoundError:
            self.taps = {}
        self._keys = {key(i) for i in self.created}

    def has(self, item: dict) -> bool:
        return key(item) in self._keys

    def add(self, item: dict) -> bool:
        k = key(item)
        if k in self._keys:
            return False
        self._keys.add(k)
        self.created.append(item)
        return True

    def remove(self, item: dict) -> None:
        k = key(item)
        self.created = [i for i in self.created if key(i) != k]
        self._keys.discard(k)

    def save(self) -> None:
        if not self.created and not self.taps:
            self.clear()
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, data in (("state.json", {"lab": self.lab, "created": self.created}), ("taps.json", self.taps)):
            tmp = self.dir / (name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.dir / name)  # atomic: a hook reading taps.json never sees half a file

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def find_tap(tap: str, netns_inode: int | None = None, root: Path | None = None) -> dict | None:
    """The taps.json entry for `tap` across labs; with several, the one whose namespace is `netns_inode`."""
    root = root or RUN_DIR
    found = []
    for f in sorted(root.glob("*/taps.json")):
        try:
            entry = json.loads(f.read_text()).get(tap)
        except (OSError, ValueError):
            continue
        if entry:
            found.append(entry)
    if len(found) > 1 and netns_inode is not None:
        for entry in found:
            path = f"/run/netns/{entry['netns']}" if entry.get("netns") else "/proc/1/ns/net"
            if nsmod.inode_at(path) == netns_inode:
                return entry
    return found[0] if found else None
