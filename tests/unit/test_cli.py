"""Flag parsing (pure): listen addresses, collector switches, one-line errors."""
import re

import pytest

from kvmnet.exporter import DEFAULT_PORT
from kvmnet.exporter.cli import UsageError, build_parser, parse_listen, settings_from
from kvmnet.exporter.service import COLLECTORS


@pytest.mark.parametrize("text,want", [(":9848", (None, 9848)), ("127.0.0.1:1", ("127.0.0.1", 1)),
                                       ("[::1]:9848", ("::1", 9848)), ("localhost:80", ("localhost", 80))])
def test_listen_addresses(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["9848", "::1:9848", "host:", "host:0", "host:65536", "host:http"])
def test_bad_listen_addresses(text):
    with pytest.raises(UsageError, match="--web.listen-address"):
        build_parser().parse_args(["--web.listen-address", text])


def test_defaults():
    s = settings_from(build_parser().parse_args([]))
    a = build_parser().parse_args([])
    assert a.listen == (None, DEFAULT_PORT) == (None, 9848)
    assert s.enabled == {c: True for c in COLLECTORS} and s.netns == [] and s.config_file is None
    assert a.log_level == "info" and a.log_format == "logfmt"


def test_collectors_netns_and_filters():
    a = build_parser().parse_args(["--no-collector.fdb", "--collector.probe", "--no-collector.identity",
                                   "--netns", "a", "--netns", "b", "--netns", "a",
                                   "--device.include", "^vm", "--device.exclude", "eth1$"])
    s = settings_from(a)
    assert s.enabled == {"bridge": True, "fdb": False, "probe": True, "identity": False}
    assert s.netns == ["a", "b"]
    assert s.include == re.compile("^vm") and s.exclude.search("eth1")
    assert set(COLLECTORS) == {"bridge", "fdb", "probe", "identity"}
