"""Named network namespaces: paths, identities, and opening a socket inside one.

A socket keeps the namespace it was created in, so a watched namespace costs one `setns` per socket, not per
scrape. `setns` changes only the calling thread; we enter, create and return at once. We call libc directly
rather than `pyroute2.netns.setns`, whose default flags create a namespace that does not exist: a deleted
namespace must stay deleted and be reported, not silently recreated empty.
"""
from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000  # <linux/sched.h>

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsGone(OSError):
    """The named namespace does not exist (never did, or was deleted)."""


def path(name: str) -> str:
    """The bind-mount path of a named namespace; "" is the exporter's own."""
    return "/proc/self/ns/net" if not name else os.path.join(NETNS_RUN_DIR, name)


# Namespace identity, the one check everyone uses: the nsfs inode behind a /run/netns bind mount, /proc/PID/ns/net
# or a namespace fd. All network namespaces live on the one nsfs, so the inode alone tells two apart.

def inode(name: str) -> int:
    """The identity of named namespace `name` ("" = ours). Raises NetnsGone when it does not exist."""
    try:
        return os.stat(path(name)).st_ino
    except FileNotFoundError:
        raise NetnsGone(f"network namespace {name!r} does not exist") from None


def inode_at(ns_path: str) -> int | None:
    """The identity of the namespace at a path (/run/netns/NAME, /proc/PID/ns/net), or None if unreadable."""
    try:
        return os.stat(ns_path).st_ino
    except OSError:
        return None


def inode_of_fd(fd: int) -> int:
    """The identity of the namespace an open namespace fd refers to."""
    return os.fstat(fd).st_ino


def pid_inode(pid: int | str) -> int | None:
    """The identity of the network namespace process `pid` lives in, or None (gone, not permitted)."""
    return inode_at(f"/proc/{pid}/ns/net")


def setns(fd: int) -> None:
    """Move this thread into the network namespace open at `fd` (no creation, unlike pyroute2's)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with this thread inside namespace `name` ("" = stay where we are)."""
    if not name:
        yield
        return
    try:
        target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsGone(f"network namespace {name!r} does not exist") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(target)
        os.close(home)


def socket_in(name: str, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket created inside namespace `name`; it stays bound to that namespace for its life."""
    with entered(name):
        return socket.socket(family, type, proto)

