"""Device names Linux accepts but that are awkward to export: not UTF-8, control characters, quotes, braces,
backslashes (one literally `\\xff`, next to the byte 0xff), non-ASCII, 15 bytes. The real exporter must serve
/metrics 200, promtool-clean, parseable by client_python, with every name mapped as README "Odd names" documents
and each counter equal to what `ip -s -j link` says."""
import subprocess

import pytest

from tests import witness
from tests.harness import samples
from tests.witness import expected_label

pytestmark = pytest.mark.netns

# name -> whether it is a bridge (else a veth end enslaved to the bridge after it in the list)
ODD = [b"br\xff", b"\\xff", b'a"b{c=d}\\', "\u00fc\u20acx".encode(), b"abcdefghijklmno", b"c\x01d", b"p\xfe\x80",
       b"q=\x7f,"]


def ipb(*argv: bytes | str) -> None:
    subprocess.run([b"ip", *[a.encode() if isinstance(a, str) else a for a in argv]], check=True,
                   capture_output=True)


def test_odd_device_names_are_served_escaped_and_match_iproute2(netns, exporters):
    bridges = ODD[:4] + ODD[5:6]
    for b in bridges:
        ipb("-n", netns, "link", "add", b, "type", "bridge")
        ipb("-n", netns, "link", "set", b, "up")
    # veth pairs whose odd ends are ports of the odd bridges; the peer ends are up so carrier is 1
    ports = [(b"abcdefghijklmno", b"br\xff"), (b"p\xfe\x80", b"\\xff"), (b"q=\x7f,", b'a"b{c=d}\\')]
    for i, (port, bridge) in enumerate(ports):
        ipb("-n", netns, "link", "add", port, "type", "veth", "peer", "name", f"kxpeer{i}")
        ipb("-n", netns, "link", "set", port, "master", bridge)
        ipb("-n", netns, "link", "set", port, "up")
        ipb("-n", netns, "link", "set", f"kxpeer{i}", "up")
    e = exporters("--netns", netns, "--no-collector.probe")
    before = witness.links_raw(netns)
    status, body, _ = e.get("/metrics")
    after = witness.links_raw(netns)
    assert status == 200
    res = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    ss = samples(body.decode())
    got_bridges = {s.labels["bridge"] for s in ss if s.name == "kvmnet_bridge_up" and s.labels["netns"] == netns}
    assert got_bridges == {expected_label(b) for b in bridges}
    assert len(got_bridges) == len(bridges)  # no two names collide (b"br\xff" vs the literal `\xff`)
    for port, bridge in ports:
        name = port.decode("utf-8", "surrogateescape")
        lbl = {"netns": netns, "bridge": expected_label(bridge), "device": expected_label(port)}
        rx = [s.value for s in ss if s.name == "kvmnet_port_receive_bytes_total"
              and all(s.labels.get(k) == v for k, v in lbl.items())]
        assert rx, (lbl, [s for s in ss if s.name == "kvmnet_port_up"])
        # a counter read before the scrape can only be <= the exporter's, read after it can only be >=
        assert before[name]["stats64"]["rx"]["bytes"] <= rx[0] <= after[name]["stats64"]["rx"]["bytes"]
        up = [s.value for s in ss if s.name == "kvmnet_port_up" and s.labels.get("device") == lbl["device"]]
        assert up == [1]
    assert "Traceback" not in e.stop()
