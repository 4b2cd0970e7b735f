"""Exporter config: strict keys and types, durations, one-line errors naming the field."""
import ipaddress

import pytest

from kvmnet.exporter.config import (
    Config,
    ConfigError,
    Target,
    from_dict,
    load_config,
    parse_duration,
    resolve_target_netns,
)


def test_full_config(tmp_path):
    f = tmp_path / "c.yml"
    f.write_text("""
netns: [lab-host, other]
probe:
  interval: 500ms
  timeout: 2s
  down_after: 5
  discover: false
  targets:
    - {name: g0, address: 10.99.0.3, netns: lab-host}
    - {name: g1, address: "fd00::1"}
""")
    c = load_config(str(f))
    assert c.netns == ["lab-host", "other"]
    assert c.probe.interval == 0.5 and c.probe.timeout == 2.0 and c.probe.down_after == 5
    assert c.probe.discover is False
    assert c.probe.targets[0] == Target(name="g0", address=ipaddress.ip_address("10.99.0.3"), netns="lab-host")
    assert c.probe.targets[1].address == ipaddress.ip_address("fd00::1") and c.probe.targets[1].netns is None


def test_defaults_and_empty_file(tmp_path):
    f = tmp_path / "empty.yml"
    f.write_text("")
    c = load_config(str(f))
    assert c == Config()
    assert c.netns == [] and c.probe.interval == 1.0 and c.probe.timeout == 1.0
    assert c.probe.down_after == 3 and c.probe.discover is True and c.probe.targets == []


@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("500ms", 0.5), ("2m", 120.0), ("1m30s", 90.0),
                                          ("1.5s", 1.5), ("1h", 3600.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("data,message", [
    ({"probe": {"targets": [{"name": f"g{i}", "address": "10.0.0.1"} for i in range(3)]
                + [{"name": "g3", "address": "10.0.0.999"}]}},
     "probe.targets[3].address: not an IP address: '10.0.0.999'"),
    ({"probe": {"targets": [{"name": "g"}]}}, "probe.targets[0].address: required"),
    ({"probe": {"targets": [{"address": "10.0.0.1"}]}}, "probe.targets[0].name: required"),
    ({"probe": {"interval": 1}}, "probe.interval: not a duration (use 1s, 500ms, 2m): 1"),
    ({"probe": {"timeout": "1 sec"}}, "probe.timeout: not a duration (use 1s, 500ms, 2m): '1 sec'"),
    ({"probe": {"timeout": "0s"}}, "probe.timeout: must be from 1ms to 60s"),
    ({"probe": {"interval": "0.0000001ms"}}, "probe.interval: must be from 10ms to 3600s"),
    ({"probe": {"interval": "9ms"}}, "probe.interval: must be from 10ms to 3600s"),
    ({"probe": {"interval": "2h"}}, "probe.interval: must be from 10ms to 3600s"),
    ({"probe": {"timeout": "99999999999d"}}, "probe.timeout: must be from 1ms to 60s"),
    ({"probe": {"timeout": "1" * 40 + "s"}},
     "probe.timeout: not a duration (use 1s, 500ms, 2m): '" + "1" * 40 + "s'"),
    ({"probe": {"interval": "1s", "down_after": 1001}},
     "probe.down_after: input should be less than or equal to 1000: 1001"),
    ({"netns": ["lab\n"]}, "netns[0]: not a namespace name (1-255 of A-Z a-z 0-9 _ . -; not . or ..): 'lab\\n'"),
    ({"probe": {"targets": [{"name": "g", "address": "224.0.0.1"}]}},
     "probe.targets[0].address: not a unicast address without a zone: '224.0.0.1'"),
    ({"probe": {"targets": [{"name": "g", "address": "fe80::1%eth0"}]}},
     "probe.targets[0].address: not a unicast address without a zone: 'fe80::1%eth0'"),
    ({"netns": [".."]}, "netns[0]: not a namespace name (1-255 of A-Z a-z 0-9 _ . -; not . or ..): '..'"),
    ({"netns": ["a" * 256]}, "netns[0]: not a namespace name (1-255 of A-Z a-z 0-9 _ . -; not . or ..): '" + "a" * 64 + "'"),
    ({"probe": {"targets": [{"name": "g\n", "address": "10.0.0.1"}]}},
     "probe.targets[0].name: not a name (1-128 printable characters, no surrounding space): 'g\\n'"),
    ({"probe": {"targets": [{"name": "g", "address": "10.0.0.1", "netns": "x\x00"}]}},
     "probe.targets[0].netns: not a namespace name (1-255 of A-Z a-z 0-9 _ . -; not . or ..): 'x\\x00'"),
    ({"probe": {"intervall": "1s"}}, "probe.intervall: unknown key"),
    ({"scrape": 1}, "scrape: unknown key"),
    ({"probe": {"targets": [{"name": "g", "address": "10.0.0.1", "mac": "x"}]}}, "probe.targets[0].mac: unknown key"),
    ({"probe": {"down_after": "3"}}, "probe.down_after: input should be a valid integer, got str"),
    ({"probe": {"down_after": 0}}, "probe.down_after: input should be greater than or equal to 1: 0"),
    ({"probe": {"discover": "maybe"}}, "probe.discover: input should be a valid boolean, got str"),
    ({"netns": "lab"}, "netns: input should be a valid list, got str"),
    ({"netns": ["ok", "no/slash"]}, "netns[1]: not a namespace name (1-255 of A-Z a-z 0-9 _ . -; not . or ..): 'no/slash'"),
    ({"probe": None}, "probe: input should be a valid dictionary, got nothing"),
    ({"probe": {"targets": [{"name": 7, "address": "10.0.0.1"}]}},
     "probe.targets[0].name: input should be a valid string, got int"),
])
def test_errors_name_the_field(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^/nonexistent/c.yml: cannot read: No such file or directory$"):
        load_config("/nonexistent/c.yml")
    f = tmp_path / "bad.yml"
    f.write_text("probe:\n  interval: [1s\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert str(e.value).startswith(f"{f}:") and "invalid YAML" in str(e.value) and "\n" not in str(e.value)
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r": \(top level\): must be a mapping"):
        load_config(str(f))


def test_target_netns_default():
    t = Target(name="g", address=ipaddress.ip_address("10.0.0.1"))
    assert resolve_target_netns(t, ["lab"]) == "lab"
    assert resolve_target_netns(t, ["lab", "lab"]) == "lab"
    assert resolve_target_netns(t, []) == ""
    assert resolve_target_netns(t, ["a", "b"]) == ""
    assert resolve_target_netns(Target(name="g", address=t.address, netns="x"), ["a"]) == "x"
