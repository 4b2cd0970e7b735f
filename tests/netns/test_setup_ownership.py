"""kvmnet-setup touches only what it made (issue 9): names taken by others are refused, processes it did not start
are never signalled, namespaces re-created by someone else are left alone, one run holds a lab at a time, and a
kill -9 at any step leaves a record the next `up` or `down` completes or undoes. Witnesses: `ip netns list`,
`ip -j link`, /run/netns and /proc, never the code under test."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.netns.setup_labs import RUN_DIR, Labs, cli, netns_list, ping, start_cli, wait_stopped

pytestmark = pytest.mark.netns


@pytest.fixture
def labs(tmp_path):
    l = Labs(tmp_path)
    yield l
    l.cleanup()


def small_lab() -> dict:
    """Every kind of object `up` makes without QEMU: namespaces, bridge, veth uplink (and the address move), a tap,
    a light guest."""
    return {
        "name": "x",
        "namespaces": {"host": "h", "lan": "l"},
        "bridges": [{"name": "br0", "address": "192.168.98.100/24", "ports": ["eth1"]}],
        "uplink": {"name": "eth1", "address": "192.168.98.100/24", "lan": {"addresses": ["192.168.98.3/24"]}},
        "taps": [{"name": "t0", "bridge": "br0"}],
        "guests": [{"name": "g1", "kind": "netns", "tap": "g1h", "bridge": "br0", "address": "192.168.98.21/24"}],
    }


def sleeper(netns: str) -> subprocess.Popen:
    """A process of someone else's, living in `netns`."""
    return subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "300"])


def ns_names(d: dict) -> set[str]:
    return {d["namespaces"]["host"], d["namespaces"]["lan"], f"{d['name']}-g1"}


def root_links() -> set[str]:
    return {l["ifname"] for l in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True,
                                                           check=True).stdout)}


def assert_nothing_left(d: dict) -> None:
    left = {n for n in os.listdir("/run/netns") if n.startswith(d["name"])} if os.path.isdir("/run/netns") else set()
    assert not left, f"left in /run/netns: {left}"
    assert not ns_names(d) & netns_list()
    assert not (RUN_DIR / d["name"]).exists(), list((RUN_DIR / d["name"]).rglob("*"))
    assert not {"t0", "g1h", "eth1"} & root_links()


def test_preexisting_light_guest_namespace_is_refused_and_its_process_lives(labs):
    f, d = labs.make(small_lab())
    gns = f"{d['name']}-g1"
    subprocess.run(["ip", "netns", "add", gns], check=True)
    ino = os.stat(f"/run/netns/{gns}").st_ino
    p = sleeper(gns)
    try:
        time.sleep(0.2)
        r = cli("up", "-c", str(f))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"kvmnet-setup: guests[0].netns: namespace '{gns}' exists"), r
        assert p.poll() is None                                   # never signalled
        assert d["namespaces"]["host"] not in netns_list()          # refused before anything was made
        r = cli("down", "-c", str(f))
        assert r.returncode == 0, r.stderr
        assert p.poll() is None and os.stat(f"/run/netns/{gns}").st_ino == ino
    finally:
        p.kill()
        p.wait()


def test_preexisting_lab_namespace_is_refused(labs, netns_factory):
    f, d = labs.make(small_lab())
    d["namespaces"]["host"] = netns_factory("ksh")
    labs.write(d, f)
    r = cli("up", "-c", str(f))
    assert r.returncode == 2 and "namespaces.host: namespace" in r.stderr and "not made by lab" in r.stderr, r.stderr
    assert d["namespaces"]["lan"] not in netns_list()


def test_namespace_recreated_by_someone_else_is_left_alone_with_a_warning(labs):
    f, d = labs.make(small_lab())
    cli("up", "-c", str(f), check=True)
    gns = f"{d['name']}-g1"
    subprocess.run(["ip", "netns", "del", gns], check=True)
    subprocess.run(["ip", "netns", "add", gns], check=True)          # someone else's now, same name
    p = sleeper(gns)
    try:
        time.sleep(0.2)
        ino = os.stat(f"/run/netns/{gns}").st_ino
        r = cli("down", "-c", str(f))
        assert r.returncode == 0, r.stderr
        assert f"namespace {gns}: not the one this lab made" in r.stderr and "left alone" in r.stderr
        assert p.poll() is None and os.stat(f"/run/netns/{gns}").st_ino == ino
        assert not {d["namespaces"]["host"], d["namespaces"]["lan"]} & netns_list()
    finally:
        p.kill()
        p.wait()
        subprocess.run(["ip", "netns", "del", gns])


def test_down_never_kills_processes_it_did_not_start(labs):
    f, d = labs.make(small_lab())
    cli("up", "-c", str(f), check=True)
    host = d["namespaces"]["host"]
    p = sleeper(host)
    try:
        time.sleep(0.2)
        r = cli("down", "-c", str(f))
        assert r.returncode == 0, r.stderr
        assert f"namespace {host}: processes kvmnet-setup did not start still run in it" in r.stderr
        assert p.poll() is None and host not in netns_list()
    finally:
        p.kill()
        p.wait()


def test_a_device_taken_in_the_host_namespace_is_refused(labs):
    f, d = labs.make(small_lab())
    cli("up", "-c", str(f), check=True)
    host = d["namespaces"]["host"]
    subprocess.run(["ip", "-n", host, "link", "del", "t0"], check=True)
    subprocess.run(["ip", "-n", host, "link", "add", "t0", "type", "bridge"], check=True)   # someone else's t0
    r = cli("up", "-c", str(f))
    assert r.returncode == 2 and "taps[0].name: device 't0' exists in namespace" in r.stderr, r.stderr
    kinds = {l["ifname"]: l.get("linkinfo", {}).get("info_kind") for l in json.loads(subprocess.run(
        ["ip", "-n", host, "-d", "-j", "link"], capture_output=True, text=True, check=True).stdout)}
    assert kinds["t0"] == "bridge"                                 # not enslaved, not changed


def test_one_run_per_lab(labs):
    f, d = labs.make(small_lab())
    first = start_cli("up", "-c", str(f), hook="stop-at:link:br0")
    try:
        wait_stopped(first)
        t = time.monotonic()
        second = cli("up", "-c", str(f), timeout=30)
        took = time.monotonic() - t
        assert second.returncode == 1 and took < 5, (second.stderr, took)
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"held by another kvmnet-setup run (pid {first.pid})" in lines[0], lines
        r = cli("down", "-c", str(f), timeout=30)
        assert r.returncode == 1 and f"pid {first.pid}" in r.stderr
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err                                 # the second run's failure took nothing of it
    ping(d["namespaces"]["lan"], "192.168.98.21")


def test_a_plain_file_under_run_netns_that_is_not_ours_is_refused_not_removed(labs):
    f, d = labs.make(small_lab())
    path = f"/run/netns/{d['namespaces']['host']}"
    open(path, "w").close()                                           # someone's half-made `ip netns add`
    try:
        r = cli("up", "-c", str(f))
        assert r.returncode == 2 and "a plain file, not a namespace" in r.stderr, r.stderr
        assert os.path.isfile(path)
    finally:
        os.unlink(path)


def _up_killed(f, hook: str) -> None:
    p = start_cli("up", "-c", str(f), hook=hook)
    out, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, (hook, p.returncode, err)


# Each step of `up` writes the record (21 times for small_lab): kill -9 just after each write, and just before
# some. Then alternately `down` (must leave nothing) or `up` (must finish the lab; then `down` leaves nothing).
POINTS = [f"kill-after:{n}" for n in range(1, 21)] + [f"kill-before:{n}" for n in (3, 5, 13, 20)]


def test_kill_9_at_every_step_then_down_or_up_completes(labs):
    f, d = labs.make(small_lab())
    for i, hook in enumerate(POINTS):
        _up_killed(f, hook)
        if i % 2:
            r = cli("up", "-c", str(f))
            assert r.returncode == 0, (hook, r.stderr)
            assert "Traceback" not in r.stderr
            ping(d["namespaces"]["lan"], "192.168.98.21")
        r = cli("down", "-c", str(f))
        assert r.returncode == 0, (hook, r.stderr)
        assert_nothing_left(d)


def test_kill_9_while_making_a_namespace_leaves_no_blocking_file(labs):
    f, d = labs.make(small_lab())
    host = d["namespaces"]["host"]
    _up_killed(f, f"kill-made:netns:{host}")      # the placeholder exists, nothing is bound onto it yet
    assert os.path.isfile(f"/run/netns/{host}") and host in netns_list()
    cli("up", "-c", str(f), check=True)
    assert subprocess.run(["ip", "-n", host, "link", "show", "br0"], capture_output=True).returncode == 0
    cli("down", "-c", str(f), check=True)
    assert_nothing_left(d)


def test_down_after_the_lab_file_was_deleted(labs):
    f, d = labs.make(small_lab())
    cli("up", "-c", str(f), check=True)
    f.unlink()                                        # the record is keyed by the file's stem (the lab's name here)
    r = cli("down", "-c", str(f))
    assert r.returncode == 0 and "removed" in r.stdout, r.stderr
    assert_nothing_left(d)


@pytest.mark.parametrize("hook", ["kill-undo:light", "kill-undo:netns", "kill-undo:netns:HOST"])
def test_kill_9_of_down_midway_then_down_again_leaves_nothing(labs, hook):
    """down undoes newest first: the light guest, the LAN namespace, then the host namespace (with what is in it)."""
    f, d = labs.make(small_lab())
    cli("up", "-c", str(f), check=True)
    p = start_cli("down", "-c", str(f), hook=hook.replace("HOST", d["namespaces"]["host"]))
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    r = cli("down", "-c", str(f))
    assert r.returncode == 0, r.stderr
    assert_nothing_left(d)
