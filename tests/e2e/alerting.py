"""Helpers for the alerting tests: a webhook receiver that records what Alertmanager posts, Debian's Alertmanager
running a test copy of deploy/alertmanager.yml, and that copy.

The test copy keeps the shipped routes, grouping keys and inhibit rules as they are; it changes only what a test
cannot wait for or reach: every receiver posts to the recorder (one URL path per receiver, so the test sees which
receiver a notification went to) and the group timers are seconds instead of minutes.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
AM_CONFIG = ROOT / "deploy" / "alertmanager.yml"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


class Recorder:
    """POSTs to http://127.0.0.1:PORT/<receiver>: each kept as (monotonic time, receiver, body)."""

    def __init__(self) -> None:
        self.got: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with rec.lock:
                    rec.got.append((time.monotonic(), self.path.strip("/"), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notifications(self, since: float = 0.0) -> list[tuple[float, str, dict]]:
        with self.lock:
            return [n for n in self.got if n[0] >= since]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def am_test_config(recorder_url: str, group_wait: str = "1s", group_interval: str = "2s",
              repeat_interval: str = "1h") -> dict:
    """deploy/alertmanager.yml with receivers pointed at the recorder and short timers; nothing else changed."""
    cfg = copy.deepcopy(yaml.safe_load(AM_CONFIG.read_text()))
    for r in cfg["receivers"]:
        shipped = [c for k, v in r.items() if k.endswith("_configs") for c in v]
        resolved = any(c.get("send_resolved", False) for c in shipped)
        for k in [k for k in r if k.endswith("_configs")]:
            del r[k]
        r["webhook_configs"] = [{"url": f"{recorder_url}/{r['name']}", "send_resolved": resolved}]

    def timers(route: dict) -> None:
        for key, value in (("group_wait", group_wait), ("group_interval", group_interval),
                           ("repeat_interval", repeat_interval)):
            if key in route or route is cfg["route"]:
                route[key] = value
        for sub in route.get("routes", []):
            timers(sub)
    timers(cfg["route"])
    return cfg


class Alertmanager:
    def __init__(self, tmp: Path, cfg: dict) -> None:
        assert ALERTMANAGER, "prometheus-alertmanager missing: scripts/bootstrap.sh installs it"
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (tmp / "alertmanager.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.proc = subprocess.Popen(
            [ALERTMANAGER, f"--config.file={tmp / 'alertmanager.yml'}", f"--storage.path={tmp / 'am-data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"],
            stdout=open(tmp / "alertmanager.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2):
                    break
            except OSError:
                assert self.proc.poll() is None, (tmp / "alertmanager.log").read_text()
                assert time.monotonic() < deadline, "alertmanager not ready in 30s"
                time.sleep(0.2)

    def post(self, alerts: list[dict]) -> None:
        req = urllib.request.Request(f"{self.url}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200

    def alerts(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def firing_alerts(notification: dict) -> list[dict]:
    return [a for a in notification["alerts"] if a["status"] == "firing"]


PROMETHEUS = shutil.which("prometheus")
RULES = ROOT / "dashboards"


class Prometheus:
    """Debian's Prometheus scraping `targets` (job kvmnet) every `scrape` seconds, evaluating the shipped rule files
    as they are every second, and sending alerts to `alertmanager`."""

    def __init__(self, tmp: Path, targets: list[str], alertmanager: str | None = None, scrape: int = 1) -> None:
        assert PROMETHEUS, "prometheus missing: scripts/bootstrap.sh installs it"
        self.tmp = tmp
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cfg = {"global": {"scrape_interval": f"{scrape}s", "evaluation_interval": "1s", "scrape_timeout": f"{scrape}s"},
               "rule_files": [str(RULES / "*.rules.yml")],
               "scrape_configs": [{"job_name": "kvmnet", "static_configs": [{"targets": targets}]}]}
        if alertmanager:
            cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'prom-data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=open(tmp / "prometheus.log", "w"), stderr=subprocess.STDOUT)
        self.started = time.time()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2):
                    break
            except OSError:
                assert self.proc.poll() is None, (tmp / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "prometheus not ready in 60s"
                time.sleep(0.3)

    def api(self, path: str, **params) -> dict:
        import urllib.parse
        q = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.base}/api/v1/{path}" + (f"?{q}" if q else ""), timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, t: float | None = None) -> list:
        return self.api("query", query=expr, time=t or time.time())["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
