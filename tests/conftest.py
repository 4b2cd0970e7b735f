"""Shared fixtures. Namespaces are uniquely named per test run and removed even when a test fails."""
from __future__ import annotations

import itertools
import os
import secrets
import subprocess

import pytest

_RUN = secrets.token_hex(2)
_counter = itertools.count()


def unique_name(prefix: str = "kt") -> str:
    """A name unique to this test run, short enough for a device name (15 chars) too."""
    return f"{prefix}{_RUN}{next(_counter)}"[:15]


def delete_netns(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def netns_factory():
    """Call it to get a fresh namespace name (created, loopback up); all are deleted afterwards."""
    made: list[str] = []

    def make(prefix: str = "kt") -> str:
        name = unique_name(prefix)
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    yield make
    for name in reversed(made):
        delete_netns(name)


@pytest.fixture
def netns(netns_factory) -> str:
    return netns_factory()


@pytest.fixture
def exporters(tmp_path):
    """Start real exporters (tests/harness.py: Exporter(*args, **kw)); all stopped afterwards, their logs free of
    tracebacks."""
    from tests.harness import Exporter

    made: list[Exporter] = []

    def start(*args: str, **kw) -> Exporter:
        e = Exporter(*args, log_dir=tmp_path, **kw)
        made.append(e)
        return e

    yield start
    for e in made:
        text = e.stop()
        assert "Traceback" not in text, text


@pytest.fixture
def lab(netns_factory):
    """lab(n): a light-guest lab (tests/harness.py LightLab) with guests g1..gn; its namespaces go afterwards."""
    from tests.harness import LightLab

    return lambda n: LightLab(netns_factory, n)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root for network namespaces")
        for item in items:
            if any(m in item.keywords for m in ("netns", "qemu", "prometheus")):
                item.add_marker(skip)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
