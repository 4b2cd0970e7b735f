"""Every value of a lab file is bounded at validation (`plan`), not found wrong half-way through `up` (issue 9)."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from kvmnet.common.lab import LabError, parse_lab

BASE = {
    "name": "b",
    "namespaces": {"host": "b-h"},
    "bridges": [{"name": "br0", "address": "10.0.0.254/24"}],
    "taps": [{"name": "t0", "bridge": "br0"}],
    "guests": [{"name": "vm1", "tap": "vm1eth0", "bridge": "br0", "address": "10.0.0.1/24"},
               {"name": "g1", "kind": "netns", "tap": "g1h", "bridge": "br0", "address": "10.0.0.2/24"}],
}


def edit(path: tuple, value):
    d = copy.deepcopy(BASE)
    node = d
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return d


BAD = [
    (("name",), "lab\n", "name: not a valid name"),
    (("name",), "lab\x00", "name: not a valid name"),
    (("namespaces", "host"), "b-h\n", "namespaces.host: not a valid name"),
    (("guests", 1, "netns"), "g\n", "guests[1].netns: not a valid name"),
    (("guests", 0, "name"), "vm1\n", "guests[0].name: not a valid name"),
    (("bridges", 0, "name"), "br\x01", "bridges[0].name: device name with a control character"),
    (("bridges", 0, "name"), "br\x7f", "bridges[0].name: device name with a control character"),
    (("guests", 0, "mac"), "0a:00:00:00:00:01\n", "guests[0].mac: not a MAC address"),
    (("guests", 0, "mac"), "00:00:00:00:00:00", "guests[0].mac: all-zero MAC address"),
    (("taps", 0, "group"), 2**64, "taps[0].group: group id must be 0 to 4294967294"),
    (("taps", 0, "group"), 2**31, "taps[0].group: no such group: 2147483648"),
    (("taps", 0, "group"), -1, "taps[0].group: group id must be 0 to"),
    (("taps", 0, "owner"), 2**63, "taps[0].owner: user id must be 0 to"),
    (("taps", 0, "owner"), 4_000_000_000, "taps[0].owner: no such user"),
    (("taps", 0, "owner"), "nosuchuser-kvmnet", "taps[0].owner: no such user"),
    (("taps", 0, "owner"), "root\x00", "taps[0].owner: no such user"),
    (("taps", 0, "owner"), True, "taps[0].owner: not a user name or number"),
    (("taps", 0, "group"), 1.5, "taps[0].group: not a group name or number"),
    (("guests", 0, "memory"), "99999999999G", "guests[0].memory: not a memory size"),
    (("guests", 0, "memory"), "2000G", "guests[0].memory: memory must be 16M to 1024G"),
    (("guests", 0, "memory"), "8M", "guests[0].memory: memory must be 16M to 1024G"),
    (("guests", 0, "memory"), "128M\n", "guests[0].memory: not a memory size"),
    (("guests", 0, "memory"), True, "guests[0].memory: not a memory size"),
    (("guests", 0, "cpus"), 0, "guests[0].cpus"),
    (("guests", 0, "cpus"), 65, "guests[0].cpus"),
    (("guests", 0, "cpus"), 2**70, "guests[0].cpus"),
    (("bridges", 0, "stp"), {"forward_delay": 1e300}, "bridges[0].stp.forward_delay"),
    (("bridges", 0, "stp"), {"forward_delay": float("nan")}, "bridges[0].stp.forward_delay"),
    (("bridges", 0, "stp"), {"hello_time": float("inf")}, "bridges[0].stp.hello_time"),
    (("bridges", 0, "stp"), {"max_age": 41}, "bridges[0].stp.max_age"),
    (("bridges", 0, "stp"), {"priority": 65536}, "bridges[0].stp.priority"),
    (("bridges", 0, "address"), "fe80::1%eth0/64", "bridges[0].address: an address with a scope"),
    (("guests", 0, "address"), "0.0.0.0/24", "guests[0].address: not a unicast address"),
    (("guests", 0, "address"), "224.0.0.1/24", "guests[0].address: not a unicast address"),
    (("guests", 0, "address"), 167772161, "guests[0].address: not an address with prefix length"),
    (("guests", 0, "gateway"), "10.0.0.1\n", "guests[0].gateway: not an IP address"),
    (("guests", 0, "image"), "disk\n.img", "guests[0].image: not a file name"),
    (("guests",), [{"name": f"g{i}", "kind": "netns", "tap": f"g{i}h", "bridge": "br0",
                    "address": f"10.0.{i // 250}.{i % 250 + 1}/16"} for i in range(4097)], "guests: "),
]


@pytest.mark.parametrize("path, value, expected", BAD, ids=[f"{'.'.join(map(str, p))}={v!r}"[:60]
                                                            for p, v, _ in BAD])
def test_out_of_bounds_is_one_line_naming_the_field(path, value, expected):
    with pytest.raises(LabError) as e:
        parse_lab(edit(path, value))
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_a_bridge_takes_at_most_1023_ports():
    d = copy.deepcopy(BASE)
    d["bridges"][0]["address"] = "10.0.0.254/16"
    d["taps"] = []
    d["guests"] = [{"name": f"g{i}", "kind": "netns", "tap": f"g{i}h", "bridge": "br0",
                    "address": f"10.0.{i // 250}.{i % 250 + 1}/16"} for i in range(1023)]
    parse_lab(copy.deepcopy(d))
    d["taps"] = [{"name": "t0", "bridge": "br0"}]
    with pytest.raises(LabError, match=r"more than 1023 ports on 'br0'"):
        parse_lab(d)


def test_plan_refuses_a_group_beyond_c_long(tmp_path):
    """Was: passed `plan`, failed in `up` with OverflowError from the TUNSETGROUP ioctl."""
    f = tmp_path / "lab.yaml"
    f.write_text(yaml.safe_dump(edit(("taps", 0, "group"), 2**64)))
    p = subprocess.run([sys.executable, "-m", "kvmnet.setup.cli", "plan", "-c", str(f)], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == (f"kvmnet-setup: {f}: taps[0].group: group id must be 0 to 4294967294: "
                                f"{2**64}"), p.stderr


def test_qmp_socket_path_longer_than_sun_path_is_refused_at_validation():
    d = copy.deepcopy(BASE)
    d["name"] = "l" * 50
    d["guests"][0]["name"] = "v" * 50
    with pytest.raises(LabError, match=r"^guests\[0\]\.name: lab and guest names too long together: .* 107 bytes"):
        parse_lab(d)
    d["guests"][0]["kind"] = "netns"  # no QMP socket for a light guest
    parse_lab(d)
