"""The web layer with a stand-in collector: /metrics parses, gzip, negotiation, coalesced scrapes, reload."""
import asyncio
import gzip
import os
import subprocess
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from kvmnet.exporter.exposition import MetricFamily, labels
from kvmnet.exporter.service import Service, Settings, load
from kvmnet.exporter.web import accepts_gzip, create_app


class StandIn:
    """A collector that reports one gauge per namespace, optionally slowly."""

    name = "standin"

    def __init__(self, netns: str, delay: float = 0.0) -> None:
        self.netns = netns
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def collect(self):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        fam = MetricFamily("kvmnet_standin_value", "gauge", "A stand-in value.")
        fam.add(labels(netns=self.netns), 42)
        return [fam]


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, name: str, **lbl) -> float | None:
    for fam in fams.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in lbl.items()):
                return s.value
    return None


def make(tmp_path, delay=0.0, config_text=None):
    made: list[StandIn] = []

    def factory(ns, svc):
        c = StandIn(ns, delay)
        made.append(c)
        return c

    settings = Settings(enabled={"standin": True, "probe": False, "identity": False})
    if config_text is not None:
        settings.config_file = str(tmp_path / "kvmnet.yml")
        (tmp_path / "kvmnet.yml").write_text(config_text)
    service = Service(settings, load(settings), factories={"standin": factory})
    app = create_app(service, reload=lambda: load(settings), lifecycle=True)
    return app, made, settings


async def test_metrics_parse_and_self_metrics(aiohttp_client, tmp_path):
    app, _, _ = make(tmp_path)
    client = await aiohttp_client(app)
    r = await client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    fams = families(await r.text())
    assert sample(fams, "kvmnet_standin_value", netns="") == 42
    assert sample(fams, "kvmnet_scrape_collector_success", collector="standin", netns="") == 1
    assert sample(fams, "kvmnet_scrape_collector_duration_seconds", collector="standin", netns="") >= 0
    build = fams["kvmnet_build_info"].samples[0]
    assert build.labels["version"] and build.labels["python"] and build.value == 1
    # an editable checkout: the revision is its git HEAD (exporter/revision.py); without git, "unknown"
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert build.labels["revision"].removesuffix("-dirty") == (git.stdout.strip() if git.returncode == 0 else "unknown")
    assert sample(fams, "process_resident_memory_bytes") > 0
    assert sample(fams, "kvmnet_config_last_reload_successful") == 1
    assert sample(fams, "kvmnet_config_last_reload_success_timestamp_seconds") > 1e9


async def test_gzip_only_when_allowed(aiohttp_client, tmp_path):
    app, _, _ = make(tmp_path)
    client = await aiohttp_client(app, auto_decompress=False)
    r = await client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert r.headers["Content-Encoding"] == "gzip"
    assert "kvmnet_standin_value" in gzip.decompress(await r.read()).decode()
    r = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in r.headers
    assert b"kvmnet_standin_value" in await r.read()
    r = await client.get("/metrics", headers={"Accept-Encoding": "gzip;q=0, deflate"})
    assert "Content-Encoding" not in r.headers


def test_accept_encoding_parsing():
    assert accepts_gzip("gzip")
    assert accepts_gzip("deflate, GZIP;q=0.5")
    assert accepts_gzip("*")
    assert not accepts_gzip("")
    assert not accepts_gzip("gzip;q=0")
    assert not accepts_gzip("*;q=0")
    assert not accepts_gzip("br, deflate")


async def test_negotiation_always_answers_text_prometheus_accepts(aiohttp_client, tmp_path):
    app, _, _ = make(tmp_path)
    client = await aiohttp_client(app)
    prom_accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                   "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    for accept in (prom_accept, "text/plain", "*/*", "application/json"):
        r = await client.get("/metrics", headers={"Accept": accept})
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        families(await r.text())


async def test_concurrent_scrapes_share_one(aiohttp_client, tmp_path):
    app, made, _ = make(tmp_path, delay=0.3)
    client = await aiohttp_client(app)
    rs = await asyncio.gather(*(client.get("/metrics") for _ in range(20)))
    bodies = [await r.text() for r in rs]
    assert all(r.status == 200 for r in rs)
    assert sum(c.calls for c in made) == 1
    assert len(set(bodies)) == 1
    await client.get("/metrics")  # and a later scrape is a fresh one
    assert sum(c.calls for c in made) == 2


async def test_landing_and_health(aiohttp_client, tmp_path):
    app, _, _ = make(tmp_path)
    client = await aiohttp_client(app)
    r = await client.get("/")
    assert r.status == 200 and 'href="metrics"' in await r.text()
    r = await client.get("/healthz")
    assert r.status == 200 and (await r.text()).strip() == "ok"
    assert (await client.get("/nope")).status == 404
    assert (await client.get("/-/reload")).status == 405


async def test_reload_good_then_bad_keeps_old(aiohttp_client, tmp_path):
    app, _, settings = make(tmp_path, config_text="netns: []\n")
    client = await aiohttp_client(app)
    fams = families(await (await client.get("/metrics")).text())
    assert sample(fams, "kvmnet_scrape_collector_success", netns="ke-absent") is None
    t0 = sample(fams, "kvmnet_config_last_reload_success_timestamp_seconds")

    (tmp_path / "kvmnet.yml").write_text("netns: [ke-absent]\n")
    r = await client.post("/-/reload")
    assert r.status == 200
    fams = families(await (await client.get("/metrics")).text())
    # a watched namespace that does not exist: its collector fails, the rest is served
    assert sample(fams, "kvmnet_scrape_collector_success", collector="standin", netns="ke-absent") == 0
    assert sample(fams, "kvmnet_scrape_collector_success", collector="standin", netns="") == 1
    assert sample(fams, "kvmnet_config_last_reload_successful") == 1
    t1 = sample(fams, "kvmnet_config_last_reload_success_timestamp_seconds")
    assert t1 >= t0

    (tmp_path / "kvmnet.yml").write_text("netns: [ke-absent]\nprobe: {interval: soon}\n")
    r = await client.post("/-/reload")
    assert r.status == 500
    assert (await r.text()).strip() == f"{tmp_path / 'kvmnet.yml'}: probe.interval: not a duration (use 1s, 500ms, 2m): 'soon'"
    fams = families(await (await client.get("/metrics")).text())
    assert sample(fams, "kvmnet_config_last_reload_successful") == 0
    assert sample(fams, "kvmnet_config_last_reload_success_timestamp_seconds") == t1
    assert sample(fams, "kvmnet_scrape_collector_success", collector="standin", netns="ke-absent") == 0

    (tmp_path / "kvmnet.yml").write_text("netns: []\n")
    assert (await client.post("/-/reload")).status == 200
    fams = families(await (await client.get("/metrics")).text())
    assert sample(fams, "kvmnet_scrape_collector_success", netns="ke-absent") is None
    assert sample(fams, "kvmnet_config_last_reload_successful") == 1


async def test_failing_collector_does_not_sink_scrape(aiohttp_client, tmp_path):
    class Broken(StandIn):
        name = "broken"

        def collect(self):
            raise RuntimeError("boom")

    settings = Settings(enabled={"probe": False, "identity": False})
    service = Service(settings, load(settings),
                      factories={"standin": lambda ns, s: StandIn(ns), "broken": lambda ns, s: Broken(ns)})
    client = await aiohttp_client(create_app(service))
    fams = families(await (await client.get("/metrics")).text())
    assert sample(fams, "kvmnet_scrape_collector_success", collector="broken") == 0
    assert sample(fams, "kvmnet_scrape_collector_success", collector="standin") == 1
    assert sample(fams, "kvmnet_standin_value") == 42


def test_bad_request_logged_as_one_line_without_traceback():
    import io
    import logging

    from aiohttp.http_exceptions import LineTooLong

    from kvmnet.exporter import logs
    buf = io.StringIO()
    logs.setup("info", "logfmt", stream=buf)
    try:
        raise LineTooLong("a" * 1000, "8190")
    except LineTooLong as exc:
        logging.getLogger("aiohttp.server").error("Error handling request from 127.0.0.1", exc_info=exc)
    out = buf.getvalue()
    assert out.count("\n") == 1 and "Traceback" not in out
    assert "level=warn" in out and "event=bad_request client=127.0.0.1" in out


async def test_inconsistent_families_are_dropped_counted_and_the_rest_served(aiohttp_client, caplog):
    class Clash(StandIn):
        name = "clash"

        def collect(self):
            fam = MetricFamily("kvmnet_standin_value", "counter", "The same name with another type.")
            fam.add(labels(netns=self.netns), 1)
            return [fam]

    settings = Settings(enabled={"probe": False, "identity": False})
    service = Service(settings, load(settings),
                      factories={"standin": lambda ns, s: StandIn(ns), "clash": lambda ns, s: Clash(ns)})
    client = await aiohttp_client(create_app(service))
    r = await client.get("/metrics")
    assert r.status == 200  # node_exporter's ContinueOnError: one bad family never sinks the scrape
    fams = families(await r.text())
    assert "kvmnet_standin_value" not in fams and "kvmnet_scrape_collector_success" in fams
    assert sample(fams, "kvmnet_scrape_render_errors_total", family="kvmnet_standin_value") == 1
    assert any("event=family_dropped family=kvmnet_standin_value" in r.getMessage() for r in caplog.records)
    caplog.clear()
    fams = families(await (await client.get("/metrics")).text())
    assert sample(fams, "kvmnet_scrape_render_errors_total", family="kvmnet_standin_value") == 2
    assert not [r for r in caplog.records if "family_dropped" in r.getMessage() and r.levelno >= 40]  # once
    assert (await client.get("/healthz")).status == 200


async def test_reload_over_http_needs_the_lifecycle_flag(aiohttp_client):
    settings = Settings(enabled={"probe": False, "identity": False})
    service = Service(settings, load(settings), factories={})
    client = await aiohttp_client(create_app(service, reload=lambda: load(settings)))
    r = await client.post("/-/reload")
    assert r.status == 403 and (await r.text()).strip() == "Lifecycle API is not enabled."


async def test_healthz_fails_while_the_prober_is_not_running(aiohttp_client):
    class Prober:
        ok = (True, "ok")

        async def start(self, loaded): ...
        async def stop(self): ...
        def health(self):
            return self.ok

    p = Prober()
    settings = Settings(enabled={"identity": False})
    service = Service(settings, load(settings), factories={}, prober=p)
    client = await aiohttp_client(create_app(service))
    assert (await client.get("/healthz")).status == 200
    p.ok = (False, "prober stalled: last cycle 9.0s ago")
    r = await client.get("/healthz")
    assert r.status == 503 and (await r.text()).strip() == "prober stalled: last cycle 9.0s ago"


async def test_prober_lifecycle_and_a_failing_start(aiohttp_client):
    class Prober:
        def __init__(self, fail: bool) -> None:
            self.fail, self.events = fail, []

        async def start(self, loaded):
            self.events.append("start")
            if self.fail:
                raise PermissionError("no CAP_NET_RAW")

        async def stop(self):
            self.events.append("stop")

        def reconfigure(self, loaded):
            self.events.append("reconfigure")

        def collectors(self):
            return [StandIn("")]

    for fail in (False, True):
        p = Prober(fail)
        settings = Settings(enabled={"identity": False})
        service = Service(settings, load(settings), factories={}, prober=p)
        client = await aiohttp_client(create_app(service, reload=lambda s=settings: load(s), lifecycle=True))
        assert p.events == ["start"]
        assert (await client.post("/-/reload")).status == 200
        assert p.events == ["start", "reconfigure"]
        fams = families(await (await client.get("/metrics")).text())
        assert sample(fams, "kvmnet_standin_value") == 42  # the prober's collectors are scraped
        await client.close()
        assert p.events == ["start", "reconfigure", "stop"]


async def test_a_lasting_failure_is_logged_once_then_recovery(caplog):
    import logging

    from kvmnet.exporter import scrape

    class Flaky(StandIn):
        name = "flaky"
        broken = True

        def collect(self):
            if self.broken:
                raise OSError("namespace 'x' does not exist")
            return super().collect()

    c = Flaky("ke-flaky")
    with caplog.at_level(logging.INFO, logger="kvmnet.scrape"):
        for _ in range(3):
            await scrape.scrape([c])
        c.broken = False
        await scrape.scrape([c])
        await scrape.scrape([c])
    events = [r.getMessage().split()[0] for r in caplog.records if r.name == "kvmnet.scrape"]
    assert events == ["event=collector_failed", "event=collector_recovered"]
