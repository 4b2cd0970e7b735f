"""deploy/prometheus-file-sd.yml: promtool accepts it, and a real Prometheus running it (its file_sd directory
pointed at a temp dir) discovers and scrapes a real kvmnet-exporter, with the relabelled instance and the targets
file's labels."""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "deploy", "prometheus-file-sd.yml")
TARGETS = os.path.join(ROOT, "deploy", "file_sd", "kvmnet-hypervisors.yml")
EXPORTER = os.path.join(os.path.dirname(sys.executable), "kvmnet-exporter")

pytestmark = [pytest.mark.prometheus, pytest.mark.timeout(180)]




def test_promtool_accepts_config():
    p = subprocess.run(["promtool", "check", "config", CONFIG], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_targets_file_shape():
    groups = yaml.safe_load(open(TARGETS))
    assert groups and all(set(g) <= {"targets", "labels"} and g["targets"] for g in groups)
    assert all(t.rsplit(":", 1)[1] == "9848" for g in groups for t in g["targets"])


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def test_prometheus_discovers_and_scrapes_through_file_sd(tmp_path):
    eport, pport = free_port(), free_port()
    shutil.copy(CONFIG, tmp_path / "prometheus.yml")
    (tmp_path / "file_sd").mkdir()
    (tmp_path / "file_sd" / "hv.yml").write_text(
        yaml.safe_dump([{"targets": [f"127.0.0.1:{eport}"], "labels": {"dc": "test", "rack": "r0"}}]))
    # The example's 15s interval, shortened so the test does not wait for it.
    cfg = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["scrape_timeout"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    exporter = subprocess.Popen([EXPORTER, "--web.listen-address", f"127.0.0.1:{eport}", "--no-collector.probe"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{pport}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "w"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                q = urllib.parse.quote('kvmnet_build_info{job="kvmnet"}')
                res = get(f"http://127.0.0.1:{pport}/api/v1/query?query={q}")["data"]["result"]
                if res:
                    break
            except OSError:
                pass
            assert prom.poll() is None, (tmp_path / "prom.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "prom.log").read_text()
            time.sleep(0.5)
        metric = res[0]["metric"]
        assert metric["instance"] == "127.0.0.1" and metric["dc"] == "test" and metric["rack"] == "r0"
        targets = get(f"http://127.0.0.1:{pport}/api/v1/targets")["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets
    finally:
        for p in (prom, exporter):
            p.terminate()
            p.wait(timeout=15)
