"""The prober inside the real `kvmnet-exporter`: guest series from the first scrape, reload (HTTP and SIGHUP) keeps
the counters of targets that stay, /probe mounted. Guests are light (namespace + veth); the witness is fping."""
import signal
import subprocess
import time

import pytest

from tests.harness import LightLab, value

pytestmark = pytest.mark.netns


def config(path, host, targets, interval="200ms"):
    lines = [f"netns: [{host}]", "probe:", f"  interval: {interval}", "  timeout: 500ms", "  discover: false",
             "  targets:"]
    lines += [f"    - {{name: {n}, address: '{a}'}}" for n, a in targets]
    path.write_text("\n".join(lines) + "\n")


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_exporter_probes_and_reload_keeps_counters(netns_factory, exporters, tmp_path):
    lab = LightLab(netns_factory, 3)
    cfg = tmp_path / "kvmnet.yml"
    config(cfg, lab.host, [("g1", "10.200.1.1"), ("g2", "10.200.1.2"), ("ghost", "10.200.7.7")])
    e = exporters("--config.file", str(cfg), "--no-collector.bridge", "--no-collector.fdb", "--web.enable-lifecycle")
    first = e.metrics()
    # Every target has its series at once; a guest that never answers too.
    for g in ("g1", "g2", "ghost"):
        assert value(first, "kvmnet_guest_ping_requests_total", netns=lab.host, guest=g) is not None
        assert value(first, "kvmnet_guest_ping_rtt_seconds_count", netns=lab.host, guest=g) is not None
    assert subprocess.run(["ip", "netns", "exec", lab.host, "fping", "-q", "10.200.1.1", "10.200.1.2"]).returncode == 0
    text = wait_for(lambda: (t := e.metrics()) and value(t, "kvmnet_guest_up", guest="g1") == 1
                    and value(t, "kvmnet_guest_up", guest="g2") == 1 and t)
    assert value(text, "kvmnet_guest_up", guest="ghost") == 0
    before = value(text, "kvmnet_guest_ping_requests_total", guest="g1")

    config(cfg, lab.host, [("g1", "10.200.1.1"), ("g3", "10.200.1.3")])
    status, body, _ = e.get("/-/reload", method="POST")
    assert status == 200, body
    text = wait_for(lambda: (t := e.metrics()) and value(t, "kvmnet_guest_up", guest="g3") == 1 and t)
    assert value(text, "kvmnet_guest_ping_requests_total", guest="g1") > before  # not reset by the reload
    assert value(text, "kvmnet_guest_up", guest="g2") is None and value(text, "kvmnet_guest_up", guest="ghost") is None

    config(cfg, lab.host, [("g1", "10.200.1.1")])
    e.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: value(e.metrics(), "kvmnet_guest_up", guest="g3") is None)

    status, body, _ = e.get(f"/probe?target=10.200.1.2&netns={lab.host}&count=3",
                            headers={"X-Prometheus-Scrape-Timeout-Seconds": "2"})
    assert status == 200 and value(body.decode(), "probe_success") == 1
    assert "level=error" not in e.stop()
