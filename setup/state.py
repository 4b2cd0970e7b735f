"""What `up` created, recorded under /run/kvmnet/<lab>/, so `down` removes exactly that, even after the lab file
was edited, and never what it did not create.

    state.json  {"lab": NAME, "created": [ITEM, ...]}   items in creation order; `down` undoes them in reverse
    journal.jsonl  one ITEM per line, written since state.json was last written whole (replayed on load)
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
An item is written (appended to journal.jsonl; state.json itself is replaced atomically: temp file, fsync, rename)
BEFORE the object is made ("intent"),
then again with the identity; so after a kill -9 at any point the next `up` or `down` knows what it may have made.
"""
from __future__ import annotations

import copy
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
        self._keys: dict[tuple, dict] = {}
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
        self._keys = {key(i): i for i in self.created}
        self._replay()
        try:
            self.taps = json.loads((self.dir / "taps.json").read_text())
        except (FileNotFoundError, ValueError):
            self.taps = {}
        self._taps_written = copy.deepcopy(self.taps)
        self._dirty: list[dict] = []
        self._full = True  # the first save of a run writes state.json whole (and folds the journal into it)

    def _replay(self) -> None:
        """Apply journal.jsonl: items written (new, or with an identity added) since state.json was last written
        whole. Each line is one item; a later line for the same key replaces the earlier."""
        try:
            lines = (self.dir / "journal.jsonl").read_bytes().split(b"\n")
        except FileNotFoundError:
            return
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if not isinstance(item, dict) or "op" not in item:
                    raise ValueError("not an item")
            except ValueError as e:
                if n == len(lines) - 1:
                    break  # a last line cut short: its write never finished, its step never began
                raise StateError(f"{self.dir / 'journal.jsonl'}:{n + 1}: unreadable record ({e}); nothing done"
                                 ) from None
            k = key(item)
            old = self._keys.get(k)
            if old is not None:
                old.clear()
                old.update(item)  # in place: keeps its position in creation order
            else:
                self._keys[k] = item
                self.created.append(item)

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
        return self._keys.get(key(item))

    def add(self, item: dict) -> bool:
        k = key(item)
        if k in self._keys:
            return False
        self._keys[k] = item
        self.created.append(item)
        self._dirty.append(item)
        return True

    def touch(self, item: dict) -> None:
        """`item` (already recorded) changed: the next save writes it."""
        self._dirty.append(item)

    def rewrite(self) -> None:
        """The next save writes state.json whole (after removals, or `created` replaced)."""
        self._full = True

    def remove(self, item: dict) -> None:
        k = key(item)
        self.created = [i for i in self.created if key(i) != k]
        self._keys.pop(k, None)
        self._full = True

    def save(self) -> None:
        _test_hook("before", self._saves + 1)
        self._saves += 1
        if not self.created and not self.taps:
            self.clear()
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.taps != self._taps_written:
                self._write("taps.json", self.taps)
                self._taps_written = copy.deepcopy(self.taps)
            if self._full:
                # Whole, atomically; then the journal it now contains goes (replaying it again would change nothing).
                self._write("state.json", {"lab": self.lab, "created": self.created})
                (self.dir / "journal.jsonl").unlink(missing_ok=True)
                self._full = False
            elif self._dirty:
                # One appended line per item changed: a run of hundreds of steps stays linear, not quadratic. Not
                # fsync()ed: what it guards against is kill -9 (the page cache outlives the process); a power loss
                # takes every namespace, link and QEMU it names with it.
                seen, lines = set(), []
                for item in self._dirty:
                    if id(item) not in seen:
                        seen.add(id(item))
                        lines.append(json.dumps(item, separators=(",", ":")) + "\n")
                fd = os.open(self.dir / "journal.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
                try:
                    os.write(fd, "".join(lines).encode())
                finally:
                    os.close(fd)
            self._dirty = []
        _test_hook("after", self._saves)

    def _write(self, name: str, data) -> None:
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
        kill-made:OP[:NAME], ...        once it is made, just before its identity is written (QEMU runs, unrecorded)
        kill-undo:OP[:NAME], ...        just before `down` (or a rollback) undoes that item"""
    hook = os.environ.get("KVMNET_TEST_HOOK")
    if not hook:
        return
    m = re.fullmatch(r"(kill|stop)-(before|after|at|made|undo):(.+)", hook)
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
