"""The real `kvmnet-exporter` process on 127.0.0.1 watching test namespaces: scrape, identity, namespace churn,
bad config, --config.check, reload by SIGHUP, promtool. The witness for the topology is iproute2 (tests/witness.py)."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests import witness
from tests.harness import EXPORTER, bridge_in, ip, samples, start_fake_qemu, stop, value

pytestmark = pytest.mark.netns


def test_scrape_identity_and_namespace_churn(netns_factory, exporters, tmp_path):
    ns, churn = netns_factory("ke"), netns_factory("ke")
    bridge_in(ns)
    tap = f"t{ns[-6:]}"
    qemu = start_fake_qemu(ns, [tap], ["-name", "guest=vmx,debug-threads=on", "-netdev", "tap,fd=3,id=hostnet0",
                                       "-device", "virtio-net-pci,netdev=hostnet0,mac=52:54:00:12:34:56"], tmp_path)
    try:
        ip("-n", ns, "link", "set", tap, "master", "br0", "up")
        ip("-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip("-n", ns, "link", "set", "va", "master", "br0", "up")
        bridge_in(churn, "brc")
        # a veth from the churn namespace into ns: when churn is really destroyed, its end in ns goes too
        ip("-n", churn, "link", "add", "vx", "type", "veth", "peer", "name", "vy", "netns", ns)
        # no prober: its discovery loop would also close the sockets; the scrape path must do it alone
        e = exporters("--netns", ns, "--netns", churn, "--no-collector.probe")
        text = e.metrics()
        assert value(text, "kvmnet_scrape_collector_success", collector="bridge", netns=ns) == 1
        assert value(text, "kvmnet_scrape_collector_success", collector="bridge", netns=churn) == 1
        assert value(text, "kvmnet_scrape_collector_success", collector="bridge", netns="") == 1
        ports = {p for p, v in witness.bridge_ports(ns).items() if v.get("master") == "br0"}
        assert ports == {tap, "va"}
        assert value(text, "kvmnet_bridge_ports", netns=ns, bridge="br0") == len(ports)
        info = [s for s in samples(text) if s.name == "kvmnet_port_info" and s.labels["netns"] == ns]
        assert {s.labels["device"]: s.labels["guest"] for s in info} == {tap: "vmx", "va": ""}
        assert value(text, "kvmnet_build_info") == 1

        # promtool's linter on the real output
        if shutil.which("promtool"):
            r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
            assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr

        # a watched namespace deleted: its collectors fail, the rest is served
        subprocess.run(["ip", "netns", "del", churn], check=True)
        text = e.metrics()
        assert value(text, "kvmnet_scrape_collector_success", collector="bridge", netns=churn) == 0
        assert value(text, "kvmnet_scrape_collector_success", collector="bridge", netns=ns) == 1
        assert value(text, "kvmnet_bridge_ports", netns=churn, bridge="brc") is None
        assert value(text, "kvmnet_bridge_ports", netns=ns, bridge="br0") == 2
        # the exporter let go of it: the namespace is destroyed, and with it the veth pair
        deadline = time.monotonic() + 10
        while "vy" in witness.links(ns):
            assert time.monotonic() < deadline, "the deleted namespace is kept alive (by the exporter's sockets?)"
            time.sleep(0.2)
            e.metrics()

        # ... and created again under the same name: picked up with no restart
        ip("netns", "add", churn)
        bridge_in(churn, "brx")
        text = e.metrics()
        assert value(text, "kvmnet_scrape_collector_success", collector="bridge", netns=churn) == 1
        assert value(text, "kvmnet_bridge_ports", netns=churn, bridge="brx") == 0
        assert value(text, "kvmnet_bridge_ports", netns=churn, bridge="brc") is None

        # the tap's QEMU dies: the tap goes away and so does its series; nothing else changes
        stop(qemu)
        text = e.metrics()
        assert value(text, "kvmnet_bridge_ports", netns=ns, bridge="br0") == 1
        assert value(text, "kvmnet_port_info", netns=ns, device=tap) is None
        err = e.stop()
        assert e.proc.returncode == 0
        assert "Traceback" not in err
        assert "event=collector_failed" in err
    finally:
        stop(qemu)


def test_gzip_and_landing(netns, exporters):
    e = exporters("--netns", netns)
    status, body, headers = e.get("/metrics", {"Accept-Encoding": "gzip",
                                               "Accept": "application/openmetrics-text;version=1.0.0,"
                                                         "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    import gzip
    assert "kvmnet_scrape_collector_success" in gzip.decompress(body).decode()
    status, body, _ = e.get("/")
    assert status == 200 and b'href="metrics"' in body


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXPORTER, *args], capture_output=True, text=True, timeout=30)


def test_bad_config_and_flags_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("probe:\n  targets:\n    - {name: a, address: 10.0.0.1}\n    - {name: b, address: nope}\n")
    tiny = tmp_path / "tiny.yml"
    tiny.write_text("probe:\n  interval: 0.0000001ms\n")
    cases = [
        (["--config.file", str(bad)], "probe.targets[1].address: not an IP address: 'nope'"),
        (["--config.file", str(bad), "--config.check"], "probe.targets[1].address"),
        (["--config.file", str(tmp_path / "missing.yml")], "missing.yml: cannot read: No such file or directory"),
        (["--web.listen-address", "nohost"], "--web.listen-address"),
        (["--netns", "../etc"], "--netns"),
        (["--device.include", "(["], "--device.include"),
        (["--log.format", "xml"], "--log.format"),
        (["--collector.nope"], "--collector.nope"),
        (["--netns", "lab\n"], "--netns"),
        (["--netns", "a" * 256], "--netns"),
        (["--netns", ".."], "--netns"),
        (["--web.listen-address", "127.0.0.1\n:9848"], "--web.listen-address"),
        (["--web.listen-address", ":0"], "--web.listen-address"),
        (["--web.listen-address", ":٩٨٤٨"], "--web.listen-address"),
        (["--device.include", "a" * 2000], "--device.include"),
        (["--config.file", str(tiny)], "probe.interval: must be from 10ms to 3600s"),
        (["--config.file", str(tiny), "--config.check"], "probe.interval"),
    ]
    for args, needle in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_sigterm_always_stops_it(netns, exporters):
    """SIGTERM is handled by a plain signal handler with a forced-exit watchdog: even a starved event loop stops."""
    e = exporters("--netns", netns, "--no-collector.probe")
    assert e.get("/metrics")[0] == 200
    t0 = time.monotonic()
    e.stop()
    assert e.proc.returncode == 0 and time.monotonic() - t0 < 5


def test_config_check_and_version(tmp_path):
    good = tmp_path / "good.yml"
    good.write_text("netns: [ke-a]\nprobe:\n  interval: 2s\n  targets:\n    - {name: g0, address: 10.0.0.3}\n")
    r = run_cli("--config.file", str(good), "--config.check")
    assert r.returncode == 0, r.stderr
    assert "config ok" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("kvmnet-exporter ")
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--web.listen-address", "--config.file", "--config.check", "--netns", "--lab",
                 "--collector.bridge", "--no-collector.bridge", "--collector.fdb", "--collector.probe",
                 "--collector.identity", "--device.include", "--device.exclude", "--log.level", "--log.format",
                 "--web.config.file", "--version"):
        assert flag in r.stdout, flag


def test_sighup_reload_and_json_logs(netns_factory, exporters, tmp_path):
    a, b = netns_factory("ke"), netns_factory("ke")
    cfg = tmp_path / "kvmnet.yml"
    cfg.write_text(f"netns: [{a}]\n")
    e = exporters("--config.file", str(cfg), "--no-collector.probe", "--web.enable-lifecycle", log_format="json")
    text = e.metrics()
    assert value(text, "kvmnet_scrape_collector_success", collector="bridge", netns=a) == 1
    assert value(text, "kvmnet_scrape_collector_success", collector="bridge", netns=b) is None

    cfg.write_text(f"netns: [{a}, {b}]\n")
    e.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while value(text, "kvmnet_scrape_collector_success", collector="bridge", netns=b) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
        text = e.metrics()
    assert value(text, "kvmnet_config_last_reload_successful") == 1

    cfg.write_text("netns: {oops: 1}\n")
    status, body, _ = e.get("/-/reload", method="POST")
    assert status == 500 and body.decode().strip() == f"{cfg}: netns: input should be a valid list, got dict"
    text = e.metrics()
    assert value(text, "kvmnet_config_last_reload_successful") == 0
    assert value(text, "kvmnet_scrape_collector_success", collector="bridge", netns=b) == 1  # old config serves
    err = e.stop()
    events = [json.loads(line) for line in err.splitlines()]
    assert {"starting", "reloaded", "reload_failed", "stopped"} <= {ev.get("event") for ev in events}
    assert all(ev["level"] in ("debug", "info", "warn", "error") and ev["ts"] for ev in events)


def test_prober_wired_config_targets_and_probe_endpoint(netns_factory, exporters, tmp_path):
    """A config target in a watched namespace: the prober starts with the app, pings it, and /probe works."""
    a, b = netns_factory("ke"), netns_factory("ke")
    ip("-n", a, "link", "add", "a0", "type", "veth", "peer", "name", "b0", "netns", b)
    ip("-n", a, "addr", "add", "10.77.0.1/24", "dev", "a0")
    ip("-n", b, "addr", "add", "10.77.0.2/24", "dev", "b0")
    ip("-n", a, "link", "set", "a0", "up")
    ip("-n", b, "link", "set", "b0", "up")
    cfg = tmp_path / "kvmnet.yml"
    cfg.write_text(f"netns: [{a}]\nprobe:\n  interval: 200ms\n  timeout: 500ms\n  discover: false\n"
                   f"  targets:\n    - {{name: g0, address: 10.77.0.2}}\n    - {{name: gone, address: 10.77.0.9}}\n")
    e = exporters("--config.file", str(cfg), "--web.enable-lifecycle")
    deadline = time.monotonic() + 15
    while True:
        text = e.metrics()
        if value(text, "kvmnet_guest_up", netns=a, guest="g0") == 1:
            break
        assert time.monotonic() < deadline, "g0 never up"
        time.sleep(0.3)
    assert value(text, "kvmnet_guest_ping_replies_total", netns=a, guest="g0") >= 1
    assert value(text, "kvmnet_guest_up", netns=a, guest="gone") == 0
    assert value(text, "kvmnet_scrape_collector_success", collector="probe") == 1

    status, body, _ = e.get(f"/probe?target=10.77.0.2&netns={a}&count=2")
    assert status == 200 and value(body.decode(), "probe_success") == 1
    status, _, _ = e.get("/probe?target=not-an-ip")
    assert status == 400
    status, _, _ = e.get(f"/probe?target=10.77.0.2&netns={b}")  # exists, but not watched
    assert status == 403
    status, body, _ = e.get("/probe?target=10.77.0.2&netns=&count=1")  # empty = the default (a), not our own
    assert status == 200 and value(body.decode(), "probe_success") == 1
    for bad in ("nan", "inf", "-1", "junk"):
        status, _, _ = e.get(f"/probe?target=10.77.0.2&netns={a}",
                             headers={"X-Prometheus-Scrape-Timeout-Seconds": bad})
        assert status == 400
    assert e.get("/healthz")[0] == 200

    # reload drops a target and changes nothing else
    cfg.write_text(f"netns: [{a}]\nprobe:\n  interval: 200ms\n  discover: false\n"
                   f"  targets:\n    - {{name: g0, address: 10.77.0.2}}\n")
    assert e.get("/-/reload", method="POST")[0] == 200
    text = e.metrics()
    assert value(text, "kvmnet_guest_up", netns=a, guest="gone") is None
    assert value(text, "kvmnet_guest_ping_replies_total", netns=a, guest="g0") >= 1  # its counters kept
    assert "Traceback" not in e.stop()


def test_lab_file_check(tmp_path):
    seed = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "seed-lab.yaml")
    r = run_cli("--lab", seed, "--config.check")
    assert r.returncode == 0, r.stderr
    assert "seed-host" in r.stdout and "2 probe targets" in r.stdout
    bad = tmp_path / "lab.yaml"
    bad.write_text(open(seed).read().replace("mac: 0a:e8:4f:c5:6a:16", "mac: 0a:zz:4f:c5:6a:16"))
    r = run_cli("--lab", str(bad), "--config.check")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "guests[0].mac" in lines[0] and "Traceback" not in r.stderr
