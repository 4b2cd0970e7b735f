"""What `up` created, recorded under /run/kvmnet/<lab>/, so `down` removes exactly that, even after the lab file
was edited, and never what it did not create.

    state.json  {"lab": NAME, "created": [ITEM, ...]}   items in creation order; `down` undoes them in reverse
    taps.json   {TAP: {"bridge": BR, "netns": NS}}       read by kvmnet-ifup, which QEMU calls with only the ifname
    lock        flock()ed by the one `up`/`down` working on the lab; holds its pid

An ITEM is a dict with "op" and what undoing it needs:
    netns {name}  light {name}  link {ns, name}  addr {ns, dev, address}  flushed {ns, dev, addresses, gateway}
    route {ns, gateway, dev}  master {ns, name}  guest {name, ns, run_dir, pidfile}  nat {ns, table}
    sysctl {ns, key, old}
and the identity of what it made, so a namesake made by someone else is never taken for it:
    netns/light: "placeholder" [st_dev, st_ino] of the empty /run/netns/NAME file made first, "ino" [st_dev, st_ino]
                 of the namespace (nsfs) bound onto it; link: "ifindex" (chosen before creating it) and "nsino" of
                 the namespace it was made in; guest: "pid" and "start" (/proc/PID/stat field 22).
An item is written (state.json replaced atomically: temp file, fsync, rename) BEFORE the object is made ("intent"),
then again with the identity; so after a kill -9 at any point the next `up` or `down` knows what it may have made.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import time
from pathlib import Path

from kvmnet.common import netns as nsmod

RUN_DIR = Path(os.environ.get("KVMNET_RUN_DIR", "/run/kvmnet"))
IDENTITY = ("addresses", "old", "run_dir", "placeholder", "ino", "nsino", "ifindex", "pid", "start", "pidfile", "t")


class Busy(Exception):
    """Another run holds the lab; str() is one line naming its pid."""


class StateError(Exception):
    """state.json cannot be read; str() is one line."""


def key(item: dict) -> tuple:
    """Items with the same key are the same object; recording one twice keeps the first (the creator)."""
    return tuple(sorted((k, str(v)) for k, v in item.items() if k not in IDENTITY))


class State:
    def __init__(self, lab: str, root: Path | None = None):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", lab or ""):
            raise ValueError(f"not a lab name: {lab!r}")  # it names a directory that `down` removes
        self.lab = lab
        self.dir = (root or RUN_DIR) / lab
        self.created: list[dict] = []
        self.taps: dict[str, dict] = {}
        self._keys: set[tuple] = set()
        self._lock_fd: int | None = None
        self._saves = 0
        self.load()

    @property
    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    def load(self) -> None:
        try:
            data = json.loads((self.dir / "state.json").read_text())
            self.created = data.get("created", [])
            if not isinstance(self.created, list) or not all(isinstance(i, dict) and "op" in i for i in self.created):
                raise ValueError("not a list of items")
        except FileNotFoundError:
            self.created = []
        except (ValueError, OSError, AttributeError) as e:
            raise StateError(f"{self.dir / 'state.json'}: unreadable record ({e}); nothing done. Inspect it; "
                             "remove it only once nothing it names exists") from None
        try:
            self.taps = json.loads((self.dir / "taps.json").read_text())
        except (FileNotFoundError, ValueError):
            self.taps = {}
        self._keys = {key(i) for i in self.created}

    # --- one run at a time -----------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Hold the lab for this run (until unlock() or exit). Fails at once, naming the holder, if another has it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # CLOEXEC: QEMU must not inherit it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise Busy(f"lab {self.lab} is held by another kvmnet-setup run (pid {holder}); "
                           "try again when it ends") from None
            try:  # the holder before us may have removed the file (down): then ours is a lock on nothing
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        self.load()  # what the run before us left, now that it cannot change under us

    def unlock(self) -> None:
        if self._lock_fd is not None:
            if not self.created and not self.taps:
                self.clear()  # nothing recorded: leave no directory behind, lock file included
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- the record ------------------------------------------------------------------------------------------------

    def has(self, item: dict) -> bool:
        return key(item) in self._keys

    def find(self, item: dict) -> dict | None:
        k = key(item)
        return next((i for i in self.created if key(i) == k), None)

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
        _test_hook("before", self._saves + 1)
        self._saves += 1
        if not self.created and not self.taps:
            self.clear()
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            for name, data in (("state.json", {"lab": self.lab, "created": self.created}), ("taps.json", self.taps)):
                tmp = self.dir / (name + ".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    os.write(fd, json.dumps(data, separators=(",", ":")).encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.dir / name)  # atomic: a reader never sees half a file
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        _test_hook("after", self._saves)

    def clear(self) -> None:
        """Remove the record. The lock file goes too (a later run checks it locked the file that is there)."""
        for p in sorted(self.dir.rglob("*"), reverse=True) if self.dir.is_dir() else []:
            try:
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
        try:
            self.dir.rmdir()
        except FileNotFoundError:
            pass


def _test_hook(when: str, n: int | None = None, item: dict | None = None) -> None:
    """For tests that kill -9 `up` between any two of its steps. KVMNET_TEST_HOOK=
        kill-before:N, stop-after:N     SIGKILL/SIGSTOP this process just before/after writing the record the Nth time
        kill-at:OP[:NAME], stop-at:...  just after the intent to make an OP item (named NAME) is on disk
        kill-made:OP[:NAME], ...        once it is made, just before its identity is written (QEMU runs, unrecorded)"""
    hook = os.environ.get("KVMNET_TEST_HOOK")
    if not hook:
        return
    m = re.fullmatch(r"(kill|stop)-(before|after|at|made):(.+)", hook)
    if not m or m.group(2) != when:
        return
    if item is None:
        hit = m.group(3) == str(n)
    else:
        op, _, name = m.group(3).partition(":")
        hit = item.get("op") == op and (not name or item.get("name") == name)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL if m.group(1) == "kill" else signal.SIGSTOP)
        time.sleep(0.1)


def hook_intent(item: dict, when: str = "at") -> None:
    _test_hook(when, item=item)


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
