"""Fuzzing the three file parsers (issue 9) with hypothesis: the lab file, the exporter's config and its web config.

Arbitrary YAML-ish text and arbitrary structures (with the schemas' own keys, so the generator gets past the top
level) never raise anything but the parser's one-line error; valid-looking generated values round-trip.
Bounded (max_examples, no deadline: the CI machine is shared) so the unit tier stays quick.
"""
from __future__ import annotations

import ipaddress
import os
import tempfile

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmnet.common import yamlfile
from kvmnet.common.lab import LabError, parse_lab
from kvmnet.exporter import webconfig
from kvmnet.exporter.config import ConfigError, from_dict

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FAST, max_examples=40)  # the round trips: each example is a whole valid file

# --- generators ---------------------------------------------------------------------------------------------------

TOKENS = list("[]{}:,-?&*!|>'\"#%@` \n\tab01.\\/") + ["\u00e9", "\x85", "\x00", "\ufeff", "<<", "---", "...",
                                                        "&a ", "*a", "!!str ", "name: ", "guests:\n  - "]
YAMLISH = st.lists(st.sampled_from(TOKENS), max_size=60).map("".join)
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["0a:00:00:00:00:01", "10.0.0.1/24", "::1", "fe80::1%eth0/64", "br0", "128M", "1s",
                              "0ms", "root", "nobody", "default", "netns", "qemu", "host", "lab\n", "a\x00b", "",
                              ".", "..", "$2b$" + "x" * 56, "TLS13", "RequireAndVerifyClientCert"]))


def tree(keys: list[str]):
    """Nested lists and dicts whose keys are mostly the schema's own."""
    key = st.sampled_from(keys) | st.text(max_size=8) | st.integers(-3, 3)
    return st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(key, c, max_size=6),
                        max_leaves=30)


LAB_KEYS = ["name", "mode", "namespaces", "host", "lan", "bridges", "address", "stp", "enabled", "forward_delay",
            "hello_time", "max_age", "priority", "ports", "uplink", "gateway", "device", "addresses", "taps", "owner",
            "group", "multi_queue", "vnet_hdr", "bridge", "guests", "kind", "tap", "mac", "netns", "memory", "cpus",
            "image", "accel", "nat", "out"]
CONFIG_KEYS = ["netns", "probe", "interval", "timeout", "down_after", "discover", "targets", "name", "address"]
WEB_KEYS = ["tls_server_config", "http_server_config", "basic_auth_users", "cert_file", "key_file",
            "client_auth_type", "client_ca_file", "client_allowed_sans", "min_version", "max_version",
            "cipher_suites", "http2", "headers", "X-Frame-Options", "admin"]


class Refusal(Exception):
    pass


def _text_or_refusal(text: str):
    try:
        return yamlfile.parse_yaml(text, "fuzz.yaml", Refusal), None
    except Refusal as e:
        return None, e


# --- the shared reader --------------------------------------------------------------------------------------------

@FAST
@given(YAMLISH)
def test_reader_raises_only_its_one_line_error(text):
    data, err = _text_or_refusal(text)
    if err is not None:
        assert "\n" not in str(err) and str(err).startswith("fuzz.yaml")


@FAST
@given(st.binary(max_size=200))
def test_reader_on_bytes(raw):
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as f:
        f.write(raw)
    try:
        yamlfile.read_yaml(f.name, Refusal)
    except Refusal as e:
        assert "\n" not in str(e) and f.name in str(e)
    finally:
        os.unlink(f.name)


# --- the lab file -------------------------------------------------------------------------------------------------

def _lab(data):
    try:
        parse_lab(data, name="fuzz")
    except LabError as e:
        assert "\n" not in str(e), repr(str(e))


@FAST
@given(YAMLISH)
def test_lab_from_text(text):
    data, err = _text_or_refusal(text)
    if err is None:
        _lab(data)


@FAST
@given(tree(LAB_KEYS))
def test_lab_from_structures(data):
    _lab(data)


@FEW
@given(st.lists(tree(LAB_KEYS), max_size=3), tree(LAB_KEYS), tree(LAB_KEYS))
def test_lab_with_plausible_top_level(guests, bridge, tap):
    _lab({"name": "fz", "namespaces": {"host": "fz-h"}, "bridges": [bridge], "taps": [tap], "guests": guests})


NAME = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)


@FEW
@given(st.lists(NAME, min_size=1, max_size=5, unique=True), st.integers(16, 65536), st.integers(1, 64),
       st.floats(2, 30), st.integers(0, 65535), st.randoms(use_true_random=False))
def test_valid_lab_round_trips(names, mem, cpus, fwd, prio, rnd):
    guests = []
    for i, n in enumerate(names):
        mac = "0a:" + ":".join(f"{rnd.randrange(256):02x}" for _ in range(5))
        guests.append({"name": n, "kind": rnd.choice(["qemu", "netns"]), "tap": f"t{i}", "bridge": "br0",
                       "mac": mac, "address": f"10.0.0.{i + 1}/24", "memory": f"{mem}M", "cpus": cpus})
    d = {"name": "rt", "namespaces": {"host": "rt-h"},
         "bridges": [{"name": "br0", "address": "10.0.0.254/24",
                      "stp": {"enabled": True, "forward_delay": fwd, "priority": prio}}],
         "guests": guests}
    macs = [g["mac"] for g in guests]
    data, err = _text_or_refusal(yaml.safe_dump(d))
    assert err is None
    if len(set(macs)) < len(macs):
        return  # duplicate MACs are refused, rightly
    lab = parse_lab(data)
    assert [(g.name, g.kind, g.tap, g.mac, str(g.address), g.memory, g.cpus) for g in lab.guests] == [
        (g["name"], g["kind"], g["tap"], g["mac"], g["address"], g["memory"], g["cpus"]) for g in guests]
    assert lab.bridges[0].stp.forward_delay == fwd and lab.bridges[0].stp.priority == prio


@FAST
@given(st.sampled_from(["name", "namespaces.host", "guests[0].name", "guests[0].netns"]),
       st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.sampled_from(["\n", "\r", "\t", "\x00", "\x1b", " ", "/"]))
def test_names_with_control_characters_are_refused(where, base, bad):
    d = {"name": "cc", "namespaces": {"host": "cc-h"}, "bridges": [{"name": "br0"}],
         "guests": [{"name": "g", "kind": "netns", "tap": "gt", "bridge": "br0", "address": "10.0.0.1/24"}]}
    value = base + bad
    if where == "name":
        d["name"] = value
    elif where == "namespaces.host":
        d["namespaces"]["host"] = value
    else:
        d["guests"][0][where.split(".")[1]] = value
    try:
        parse_lab(d)
    except LabError as e:
        assert str(e).startswith(where) and "\n" not in str(e)
    else:
        raise AssertionError(f"{where}={value!r} accepted")


# --- the exporter's config ----------------------------------------------------------------------------------------

def _config(data):
    try:
        from_dict(data)
    except ConfigError as e:
        assert "\n" not in str(e), repr(str(e))


@FAST
@given(YAMLISH)
def test_config_from_text(text):
    data, err = _text_or_refusal(text)
    if err is None:
        _config(data)


@FAST
@given(tree(CONFIG_KEYS))
def test_config_from_structures(data):
    _config(data)


@FEW
@given(st.lists(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True), max_size=4, unique=True),
       st.integers(1, 100_000), st.integers(1, 100), st.booleans(),
       st.lists(st.tuples(st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.ip_addresses()), max_size=4))
def test_valid_config_round_trips(netns, interval_ms, down_after, discover, targets):
    d = {"netns": netns, "probe": {"interval": f"{interval_ms}ms", "down_after": down_after, "discover": discover,
                                   "targets": [{"name": n, "address": str(a)} for n, a in targets]}}
    data, err = _text_or_refusal(yaml.safe_dump(d))
    assert err is None
    try:
        c = from_dict(data)
    except ConfigError as e:  # the exporter may bound these more tightly than generated; still one line
        assert "\n" not in str(e)
        return
    assert c.netns == netns and c.probe.down_after == down_after and c.probe.discover == discover
    assert abs(c.probe.interval - interval_ms / 1000) < 1e-9
    assert [(t.name, t.address) for t in c.probe.targets] == [(n, ipaddress.ip_address(a)) for n, a in targets]


# --- the web config -----------------------------------------------------------------------------------------------

def _web(text: str):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "web.yml")
        with open(path, "w") as f:
            f.write(text)
        try:
            webconfig.parse(path)
        except webconfig.WebConfigError as e:
            assert "\n" not in str(e) and path in str(e), repr(str(e))


@FAST
@given(YAMLISH)
def test_web_config_from_text(text):
    _web(text)


@FAST
@given(tree(WEB_KEYS))
def test_web_config_from_structures(data):
    _web(yaml.safe_dump(data))


@FEW
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True),
                       st.text(alphabet="./ABCXYZabcxyz0189", min_size=53, max_size=53).map(lambda t: "$2b$10$" + t),
                       max_size=3),
       st.booleans())
def test_valid_web_config_round_trips(users, http2):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "web.yml")
        with open(path, "w") as f:
            yaml.safe_dump({"basic_auth_users": users, "http_server_config": {"http2": http2}}, f)
        cfg = webconfig.parse(path)
    assert cfg.users == {u: h.encode() for u, h in users.items()}
