"""NetlinkSource's I/O without root: its real dump, retry and event code against a fake kernel (a SOCK_SEQPACKET
socketpair fed with the recorded dumps, tests/unit/fakenetlink.py). The expected values come from the pure
decoders over the same recordings (test_netlink_parse.py checks those against the recording's known contents,
and test_netlink_pyroute2.py against pyroute2)."""
from __future__ import annotations

import errno
import logging
import socket

import pytest

from kvmnet.common import rtnl
from kvmnet.exporter.sources import netlink as nl

from .fakenetlink import DATA, FakeKernel


def expected(events: bool = False) -> nl.BridgeSnapshot:
    read = lambda n: [(DATA / f"{n}.bin").read_bytes()]  # noqa: E731
    links, fdb = nl.links_from_dump(read("links")), nl.fdb_from_dump(read("fdb"))
    moves: dict[int, int] = {}
    if events:
        nl.apply_events((DATA / "events.bin").read_bytes(), links, fdb, moves)
    stp: dict = {}
    stats = nl.stats_from_dump(read("stats"), stp)
    # Per snapshot the source also dumps the qdiscs and the bridges alone (kind filter: bridges.bin).
    return nl.build_snapshot("", links, stats, fdb, stp=stp, qdiscs=nl.qdiscs_from_dump(read("qdisc")),
                             bridges_now=nl.links_from_dump(read("bridges")), moves=moves)


@pytest.fixture
def kernel():
    k = FakeKernel()
    yield k
    k.close()


@pytest.fixture
def src(kernel):
    s = nl.NetlinkSource("", socket_factory=kernel.factory, timeout=2.0)
    yield s
    s.close()


def test_multipart_dumps_give_the_recorded_snapshot(kernel, src):
    assert src.snapshot() == expected()
    # One link dump and one FDB dump (the first resync), then only counters.
    assert src.snapshot() == expected()
    assert kernel.requests.count((rtnl.RTM_GETLINK, 0)) == 1 + 2  # the resync's, then one bridges-only per snapshot
    assert kernel.requests.count((rtnl.RTM_GETSTATS, 0)) == 2
    assert kernel.requests.count((rtnl.RTM_GETQDISC, 0)) == 2
    assert src.resyncs == 1 and src.errors == 0
    assert src.neighbours() == nl.neighbours_from_dump([(DATA / "neigh.bin").read_bytes()], src._links)


def test_events_are_applied_without_a_resync(kernel, src):
    src.snapshot()
    kernel.event((DATA / "events.bin").read_bytes())
    assert src.snapshot() == expected(events=True)
    assert src.resyncs == 1


def test_enobufs_on_the_event_socket_resyncs(kernel, src, caplog):
    src.snapshot()
    kernel.event((DATA / "events.bin").read_bytes())
    kernel.enobufs = 1
    with caplog.at_level(logging.INFO, "kvmnet.netlink"):
        snap = src.snapshot()
    assert src.resyncs == 2
    assert snap == expected()  # the dropped events are replaced by a fresh dump (of the recorded state)
    assert "event=netlink_events_overflow" in caplog.text


@pytest.mark.parametrize("mode", ["done_error", "error"])
def test_a_dump_error_fails_that_request_and_keeps_the_sockets(kernel, src, mode):
    src.snapshot()
    opened = list(kernel.opened)
    kernel.script[rtnl.RTM_GETSTATS] = [mode]
    with pytest.raises(nl.NetlinkProtocolError) as exc:
        src.snapshot()
    assert exc.value.errno == (errno.EMSGSIZE if mode == "done_error" else errno.EOPNOTSUPP)
    assert src.errors == 1
    assert src.snapshot() == expected()  # the next scrape: same sockets, no resync
    assert kernel.opened == opened and src.resyncs == 1


def test_an_interrupted_dump_is_retried(kernel, src, caplog):
    kernel.script[rtnl.RTM_GETLINK] = ["intr"]
    with caplog.at_level(logging.INFO, "kvmnet.netlink"):
        assert src.snapshot() == expected()
    assert src.dumps_interrupted == 1 and src.errors == 0
    assert kernel.requests.count((rtnl.RTM_GETLINK, 0)) == 2 + 1  # the retried resync, then the bridges-only dump
    assert "event=netlink_dump_interrupted" in caplog.text


def test_a_dump_interrupted_every_time_is_never_used(kernel, src, caplog):
    src.snapshot()
    kernel.script[rtnl.RTM_GETSTATS] = ["intr"] * nl.DUMP_ATTEMPTS
    with pytest.raises(nl.NetlinkProtocolError, match="still interrupted"):
        src.snapshot()
    assert src.dumps_interrupted == nl.DUMP_ATTEMPTS and src.errors == 1
    assert src.snapshot() == expected()


def test_an_interrupted_resync_leaves_nothing_half_synced(kernel, src):
    kernel.script[rtnl.RTM_GETLINK] = ["intr"] * nl.DUMP_ATTEMPTS
    with pytest.raises(nl.NetlinkProtocolError):
        src.snapshot()
    assert src.resyncs == 0 and src._links == {}
    assert src.snapshot() == expected() and src.resyncs == 1


def test_a_truncated_datagram_drops_only_the_request_socket(kernel, src):
    src.snapshot()
    kernel.script[rtnl.RTM_GETSTATS] = ["truncated"]
    with pytest.raises(OSError, match="truncated"):
        src.snapshot()
    assert src.errors == 1
    assert src.snapshot() == expected()
    assert kernel.opened.count(()) == 2  # a new request socket; the event socket and tables stayed
    assert src.resyncs == 1


@pytest.mark.parametrize("mode", ["malformed", "overrun"])
def test_a_malformed_attribute_fails_the_dump(kernel, src, mode):
    kernel.script[rtnl.RTM_GETLINK] = [mode]
    with pytest.raises(nl.NetlinkProtocolError, match="malformed"):
        src.snapshot()
    assert src.snapshot() == expected()


def test_a_malformed_event_resyncs(kernel, src):
    src.snapshot()
    bad = bytearray(rtnl.HDR.pack(20, rtnl.RTM_NEWLINK, 0, 0, 0) + b"\0" * 4)  # an ifinfomsg cut to 4 bytes
    kernel.events_peer.send(bytes(bad))
    src.snapshot()
    assert src.resyncs == 2 and src.errors == 1


def test_no_answer_times_out_and_reopens_the_request_socket(kernel):
    src = nl.NetlinkSource("", socket_factory=kernel.factory, timeout=0.2)
    try:
        src.snapshot()
        kernel.script[rtnl.RTM_GETSTATS] = ["silent"]
        with pytest.raises(socket.timeout):
            src.snapshot()
        assert src.snapshot() == expected() and src.resyncs == 1
    finally:
        src.close()


def test_a_namespace_that_is_gone_closes_the_sockets(kernel):
    src = nl.NetlinkSource("kg-no-such-netns", socket_factory=kernel.factory)
    with pytest.raises(nl.NetnsGone):
        src.snapshot()
    assert kernel.opened == []
