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
from contextlib import contextmanager
from typing import Iterator

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000  # <linux/sched.h>

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsGone(OSError):
    """The named namespace does not exist (never did, or was deleted)."""


def path(name: str) -> str:
    """The bind-mount path of a named namespace; "" is the exporter's own."""
    return "/proc/self/ns/net" if not name else os.path.join(NETNS_RUN_DIR, name)


def inode(name: str) -> int:
    """The namespace's identity (its nsfs inode), comparable with `os.stat('/proc/PID/ns/net').st_ino`."""
    try:
        return os.stat(path(name)).st_ino
    except FileNotFoundError:
        raise NetnsGone(f"network namespace {name!r} does not exist") from None


def _setns(fd: int) -> None:
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
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def socket_in(name: str, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket created inside namespace `name`; it stays bound to that namespace for its life."""
    with entered(name):
        return socket.socket(family, type, proto)

