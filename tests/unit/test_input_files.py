"""Hostile and careless input files, through the real CLIs (issue 9): the lab file (`kvmnet-setup plan -c F`), the
exporter's config (`kvmnet-exporter --config.check --config.file F`) and its web config (`--web.config.file F`).

Each must fail with one line naming the file (and the place), exit 2, no traceback, quickly and without eating
memory: FIFOs, devices, directories, sockets, oversize, binary, not UTF-8, control characters, deep nesting, alias
bombs, recursive aliases, duplicate keys, a non-mapping top level, several documents, Python tags.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""

# name -> (how to make it at path p, a fragment of the expected line)
CASES = {
    "fifo": (lambda p: os.mkfifo(p), "not a regular file (a FIFO)"),
    "directory": (lambda p: os.mkdir(p), "not a regular file (a directory)"),
    "socket": (lambda p: socket.socket(socket.AF_UNIX).bind(str(p)), "cannot read"),
    "dev-zero": (lambda p: os.symlink("/dev/zero", p), "not a regular file (a character device)"),
    "missing": (lambda p: None, "cannot read: No such file or directory"),
    "oversize": (lambda p: p.write_bytes(b"# pad\n" * 300_000), "too large: 1800000 bytes (at most 1048576)"),
    "binary": (lambda p: p.write_bytes(os.urandom(4096) + b"\xff"), "not UTF-8 text"),
    "latin-1": (lambda p: p.write_bytes(b"name: caf\xe9\n"), ":1: not UTF-8 text (byte 9: 0xe9)"),
    "nul": (lambda p: p.write_bytes(b"name: a\x00b\n"), ":1: control character '\\x00'"),
    "escape": (lambda p: p.write_bytes(b"name: a\x1b[2Jb\n"), ":1: control character '\\x1b'"),
    "deep-flow": (lambda p: p.write_text("[" * 100_000), "invalid YAML: nested deeper than 64 levels"),
    "deep-block": (lambda p: p.write_text("".join(" " * i + "a:\n" for i in range(200))),
                   "invalid YAML: nested deeper than 64 levels"),
    "alias-bomb": (lambda p: p.write_text(BOMB), "invalid YAML: aliases expand to more than 10000 nodes"),
    "recursive-alias": (lambda p: p.write_text("a: &a [*a]\n"), "alias *a refers to an unknown or enclosing anchor"),
    "many-values": (lambda p: p.write_text("a: [" + ",".join(["1"] * 60_000) + "]\n"), "more than 50000 values"),
    "duplicate-key": (lambda p: p.write_text("probe: {}\nname: x\nprobe: {}\n"),
                      ":3:1: invalid YAML: duplicate key 'probe' (also on line 1)"),
    "list-top": (lambda p: p.write_text("- a\n- b\n"), "(top level)"),
    "scalar-top": (lambda p: p.write_text("just a string\n"), "(top level)"),
    "two-documents": (lambda p: p.write_text("a: 1\n---\nb: 2\n"), "invalid YAML: but found another document"),
    "python-tag": (lambda p: p.write_text("a: !!python/object/apply:os.system [id]\n"),
                   "invalid YAML: could not determine a constructor"),
    "bad-yaml": (lambda p: p.write_text("a: [1, 2\n"), "invalid YAML"),
}

TOOLS = {
    "lab": lambda f: [sys.executable, "-m", "kvmnet.setup.cli", "plan", "-c", str(f)],
    "config": lambda f: [sys.executable, "-m", "kvmnet.exporter.cli", "--config.check", "--config.file", str(f)],
    "web": lambda f: [sys.executable, "-m", "kvmnet.exporter.cli", "--config.check", "--web.config.file", str(f)],
}


# Every case through the lab CLI; the core ones through the exporter's two files too (the reader is shared, and each
# case costs an interpreter start).
CORE = ("fifo", "directory", "dev-zero", "oversize", "binary", "latin-1", "deep-flow", "alias-bomb", "duplicate-key",
        "list-top")
PAIRS = [("lab", c) for c in CASES] + [(t, c) for t in ("config", "web") for c in CORE]


@pytest.mark.parametrize("tool, case", PAIRS, ids=[f"{t}-{c}" for t, c in PAIRS])
def test_bad_file_is_one_line_exit_2_quickly(tmp_path, tool, case):
    make, expected = CASES[case]
    f = tmp_path / "input.yaml"
    make(f)
    t = time.monotonic()
    # ulimit -v: a file that expanded in memory would die here instead of swapping the machine.
    p = subprocess.run(["sh", "-c", 'ulimit -v 1000000; exec "$@"', "sh", *TOOLS[tool](f)], capture_output=True,
                       text=True, timeout=20, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert str(f) in lines[0] or (case in ("list-top", "scalar-top") and tool != "web"), lines[0]
    assert expected in lines[0], lines[0]
    # Interpreter start-up and imports take most of this; the reading itself is milliseconds.
    assert took < 5, took


def test_a_fifo_never_blocks_even_with_a_writer_that_never_writes(tmp_path):
    f = tmp_path / "fifo.yaml"
    os.mkfifo(f)
    holder = os.open(f, os.O_RDWR | os.O_NONBLOCK)  # a writer is attached: a blocking read would wait forever
    try:
        p = subprocess.run(TOOLS["lab"](f), capture_output=True, text=True, timeout=20)
        assert p.returncode == 2 and "not a regular file (a FIFO)" in p.stderr
    finally:
        os.close(holder)


def test_reading_is_fast_in_process():
    """The bounded reader itself: each refusal in milliseconds (no subprocess start-up in the number)."""
    from kvmnet.common import yamlfile

    class E(Exception):
        pass

    for text in (BOMB, "[" * 1_000_000, "a: [" + ",".join(["1"] * 400_000) + "]"):
        t = time.monotonic()
        with pytest.raises(E):
            yamlfile.parse_yaml(text, "f", E)
        assert time.monotonic() - t < 0.5


def test_merge_keys_and_small_aliases_still_work(tmp_path):
    from kvmnet.common import yamlfile

    class E(Exception):
        pass

    text = "d: &d {memory: 256M, cpus: 1}\nguests:\n" + "".join(f"  - {{<<: *d, name: g{i}}}\n" for i in range(50))
    data = yamlfile.parse_yaml(text, "f", E)
    assert data["guests"][7] == {"memory": "256M", "cpus": 1, "name": "g7"}
    assert yamlfile.parse_yaml("a: &x {k: 1}\nb: {<<: *x, k: 2}\n", "f", E)["b"] == {"k": 2}


def test_a_lab_at_the_size_limit_validates_in_well_under_a_second(tmp_path):
    """The worst honest case: a file near the node budget, with the one mistake at the very end."""
    from kvmnet.common.lab import LabError, load_lab

    guests = "".join(f"  - {{name: g{i}, kind: netns, tap: g{i}h, bridge: br0, address: 10.1.{i // 250}.{i % 250 + 1}"
                     f"/16}}\n" for i in range(3000))
    f = tmp_path / "big.yaml"
    f.write_text("name: big\nnamespaces: {host: big-h}\nbridges: [{name: br0}]\nguests:\n" + guests
                 + "  - {name: g0, kind: netns, tap: x, bridge: br0, address: 10.2.0.1/16}\n")
    t = time.monotonic()
    with pytest.raises(LabError, match=r"guests\[3000\]\.name: duplicate guest name"):
        load_lab(f)
    assert time.monotonic() - t < 2.0  # ~0.5 s idle; the shared CI machine is slower


def test_down_with_an_unreadable_file_says_so(tmp_path):
    f = tmp_path / "lab.yaml"
    os.mkfifo(f)
    p = subprocess.run([sys.executable, "-m", "kvmnet.setup.cli", "down", "-c", str(f)], capture_output=True,
                       text=True, timeout=20)
    assert p.returncode == 2 and "not a regular file (a FIFO)" in p.stderr, p.stderr


def test_down_never_takes_a_state_key_that_escapes_the_run_directory(tmp_path):
    """An invalid lab file whose name is '../..': down once turned that into rmtree(/run/kvmnet/../..)."""
    f = tmp_path / "...yaml"  # its stem is '..'
    f.write_text("name: ../..\nguests: 3\n")
    env = dict(os.environ, KVMNET_RUN_DIR=str(tmp_path / "run"))
    (tmp_path / "canary").write_text("x")
    p = subprocess.run([sys.executable, "-m", "kvmnet.setup.cli", "down", "-c", str(f)], capture_output=True,
                       text=True, timeout=20, env=env)
    assert p.returncode == 2 and "name: not a valid name" in p.stderr, p.stderr
    assert (tmp_path / "canary").exists() and Path(f).exists()
