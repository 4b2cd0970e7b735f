"""Least privilege, seen from /proc: the exporter started as root says what it needs, and every one of its threads
ends up with only CAP_NET_RAW, CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (effective, permitted and
bounding), while it still watches a namespace and pings in it."""
import os

import pytest

from tests.harness import bridge_in, ip, values

pytestmark = pytest.mark.netns
KEPT = (1 << 2) | (1 << 13) | (1 << 19) | (1 << 21)  # DAC_READ_SEARCH, NET_RAW, SYS_PTRACE, SYS_ADMIN


def caps(status_path: str) -> dict[str, int]:
    out = {}
    for line in open(status_path):
        k, _, v = line.partition(":")
        if k.startswith("Cap"):
            out[k] = int(v.strip(), 16)
    return out


def test_root_exporter_keeps_only_what_it_needs(netns, exporters, tmp_path):
    bridge_in(netns)
    ip("-n", netns, "addr", "add", "10.55.0.1/24", "dev", "br0")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"netns: [{netns}]\nprobe:\n  interval: 200ms\n  targets:\n    - {{name: gw, address: 10.55.0.1}}\n")
    e = exporters("--config.file", str(cfg))
    import time
    deadline = time.monotonic() + 15
    while values(e.samples(), "kvmnet_guest_up", guest="gw") != [1.0]:
        assert time.monotonic() < deadline, e.log()
        time.sleep(0.3)
    tasks = os.listdir(f"/proc/{e.proc.pid}/task")
    assert len(tasks) > 1  # the scrape threads exist by now
    for tid in tasks:
        c = caps(f"/proc/{e.proc.pid}/task/{tid}/status")
        assert c["CapEff"] == c["CapPrm"] == c["CapBnd"] == KEPT, (tid, {k: hex(v) for k, v in c.items()})
        assert c["CapInh"] == c["CapAmb"] == 0
    log = e.log()
    assert "event=privileges running_as=root" in log and "CAP_NET_RAW=raw ICMP" in log
    assert "event=privileges_dropped" in log and "privileges_missing" not in log


def test_what_a_run_does_not_use_is_not_kept(exporters):
    """Only its own namespace, no identity: CAP_NET_RAW alone remains; the log says a reload cannot add namespaces."""
    e = exporters("--no-collector.identity")
    assert e.get("/metrics")[0] == 200
    for tid in os.listdir(f"/proc/{e.proc.pid}/task"):
        c = caps(f"/proc/{e.proc.pid}/task/{tid}/status")
        assert c["CapEff"] == c["CapPrm"] == c["CapBnd"] == 1 << 13, {k: hex(v) for k, v in c.items()}
    assert "event=privileges_note" in e.log()
