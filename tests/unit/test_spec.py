"""The lab file schema: every bad input is one line naming the field."""
from __future__ import annotations

import copy
import ipaddress
from pathlib import Path

import pytest
import yaml

from kvmnet.common.lab import LabError, default_mac, load_lab, parse_lab

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BASE = {
    "name": "t",
    "namespaces": {"host": "t-host", "lan": "t-lan"},
    "bridges": [{"name": "br0", "address": "192.168.98.100/24", "ports": ["eth1"]}],
    "uplink": {"name": "eth1", "lan": {"addresses": ["192.168.98.3/24"]}},
    "taps": [{"name": "vm1eth0"}],
    "guests": [
        {"name": "vm1", "tap": "vm1eth0", "bridge": "br0", "mac": "0A:E8:4F:C5:6A:16", "address": "192.168.98.11/24"},
        {"name": "g1", "kind": "netns", "tap": "g1h", "bridge": "br0", "address": "192.168.98.21/24"},
    ],
}


def lab_with(**edits):
    d = copy.deepcopy(BASE)
    for path, value in edits.items():
        node, keys = d, path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return d


def error(d) -> str:
    with pytest.raises(LabError) as e:
        parse_lab(d)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_examples_load_with_the_contract_fields():
    seed = load_lab(EXAMPLES / "seed-lab.yaml")
    assert seed.name == "seed" and seed.host_netns == "seed-host" and seed.lan_netns == "seed-lan"
    vm1 = seed.guests[0]
    assert (vm1.name, vm1.kind, vm1.device, vm1.bridge, vm1.mac) == ("vm1", "qemu", "vm1eth0", "br0", "0a:e8:4f:c5:6a:16")
    assert vm1.address == ipaddress.ip_interface("192.168.98.11/24")
    assert seed.guests[1].device == "vm2eth0"
    assert seed.uplink.lan.addresses == [ipaddress.ip_interface("192.168.98.3/24")]
    nat = load_lab(EXAMPLES / "nat-lab.yaml")
    assert nat.nat.bridge == "br0" and nat.bridges[0].ports == []


def test_mac_lowercased_and_defaulted_stably():
    lab = parse_lab(copy.deepcopy(BASE))
    assert lab.guests[0].mac == "0a:e8:4f:c5:6a:16"
    assert lab.guests[1].mac == default_mac("t", "g1") == parse_lab(copy.deepcopy(BASE)).guests[1].mac
    assert lab.guests[1].kind == "netns" and lab.guests[1].device == "g1h"


def test_host_mode_has_no_namespace():
    d = copy.deepcopy(BASE)
    d["mode"] = "host"
    del d["namespaces"]
    d["uplink"] = {"name": "eth1"}
    assert parse_lab(d).host_netns == ""


@pytest.mark.parametrize("edits, expected", [
    ({"guests__1__mac": "0a:zz"}, "guests[1].mac: not a MAC address: '0a:zz'"),
    ({"guests__0__mac": "01:00:5e:00:00:01"}, "guests[0].mac: multicast MAC"),
    ({"guests__1__tap": "a-very-long-name0"}, "guests[1].tap: device name must be 1 to 15 bytes"),
    ({"guests__1__tap": "a/b"}, "guests[1].tap: device name the kernel refuses"),
    ({"guests__1__tap": "a b"}, "guests[1].tap: device name the kernel refuses"),
    ({"guests__1__tap": "a:b"}, "guests[1].tap: device name the kernel refuses"),
    ({"bridges__0__name": "br/0"}, "bridges[0].name: device name the kernel refuses"),
    ({"guests__1__colour": "red"}, "guests[1].colour: unknown key"),
    ({"surprise": 1}, "surprise: unknown key"),
    ({"guests__1__name": "vm1"}, "guests[1].name: duplicate guest name: 'vm1'"),
    ({"guests__1__mac": "0a:e8:4f:c5:6a:16"}, "guests[1].mac: duplicate MAC address"),
    ({"guests__1__address": "192.168.98.11/24"}, "guests[1].address: duplicate address: 192.168.98.11"),
    ({"guests__1__address": "192.168.98.3/24"}, "guests[1].address: duplicate address: 192.168.98.3"),
    ({"guests__1__tap": "vm1eth0"}, "guests[1].tap: duplicate device name: 'vm1eth0'"),
    ({"guests__1__tap": "br0"}, "guests[1].tap: duplicate device name: 'br0'"),
    ({"guests__1__address": "10.1.2.3/24"}, "guests[1].address: 10.1.2.3/24 is outside bridge br0's subnet"),
    ({"guests__1__address": "192.168.98.21"}, "guests[1].address: address needs a prefix length"),
    ({"guests__1__bridge": "br9"}, "guests[1].bridge: no such bridge: 'br9'"),
    ({"guests__0__kind": "xen"}, "guests[0].kind: input should be 'qemu' or 'netns': 'xen'"),
    ({"guests__0__image": "/nonexistent/debian-8.7.1-amd64.img"}, "guests[0].image: no such image file"),
    ({"guests__0__cpus": 0}, "guests[0].cpus:"),
    ({"guests__0__memory": "lots"}, "guests[0].memory: not a memory size"),
    ({"bridges__0__stp": {"enabled": True, "forward_delay": 99}}, "bridges[0].stp.forward_delay:"),
    ({"bridges__0__ports": ["eth9"]}, "bridges[0].ports[0]: no such device in the lab"),
    ({"bridges__0__fdb_max_learned": -1}, "bridges[0].fdb_max_learned:"),
    ({"bridges__0__fdb_max_learned": 1 << 21}, "bridges[0].fdb_max_learned:"),
    ({"namespaces": None}, "namespaces: required in netns mode"),
    ({"uplink": {"name": "eth1"}}, "uplink.lan: required in netns mode"),
    ({"namespaces": {"host": "t-host"}}, "namespaces.lan: required when uplink.lan is given"),
    ({"taps__0__owner": "no-such-user-here"}, "taps[0].owner: no such user: 'no-such-user-here'"),
    ({"guests__0__name": "vm 1"}, "guests[0].name: not a valid name"),
])
def test_bad_input_names_the_field(edits, expected):
    assert error(lab_with(**edits)).startswith(expected)


def test_missing_field():
    d = copy.deepcopy(BASE)
    del d["guests"][1]["address"]
    assert error(d) == "guests[1].address: required"


def test_nat_needs_a_routed_uplink():
    d = copy.deepcopy(BASE)
    d["nat"] = {"bridge": "br0", "out": "eth1"}
    assert error(d).startswith("nat.out: 'eth1' is enslaved to 'br0'")


def test_invalid_yaml_and_unreadable(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nbridges: [\n")
    with pytest.raises(LabError) as e:
        load_lab(f)
    assert "invalid YAML" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LabError, match="cannot read"):
        load_lab(tmp_path / "absent.yaml")
    f.write_text("- just\n- a list\n")
    with pytest.raises(LabError, match=r": \(top level\): the lab file must be a mapping"):
        load_lab(f)


def test_image_relative_to_the_lab_file(tmp_path):
    (tmp_path / "disk.qcow2").write_bytes(b"QFI\xfb")
    d = copy.deepcopy(BASE)
    d["guests"][0]["image"] = "disk.qcow2"
    f = tmp_path / "lab.yaml"
    f.write_text(yaml.safe_dump(d))
    assert load_lab(f).guests[0].image == "disk.qcow2"
