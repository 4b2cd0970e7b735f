"""Static checks of dashboards/: Grafana JSON, rule files, promtool's own checks and unit tests.

What a live Prometheus proves (every panel returns data, every alert fires on a real fault) is in
tests/e2e/test_dashboards_live.py; here is everything that needs no exporter: the JSON is what generate.py writes,
importable (schemaVersion, datasource variable, ids, grid), every panel has a unit, every query parses as PromQL
once Grafana's variables are substituted (promtool is the parser), every metric named is one kvmnet exports or a
recording rule defines, and the rules pass `promtool check rules` and `promtool test rules`.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .goldenfile import exported_names

ROOT = Path(__file__).resolve().parents[2]
DASH = ROOT / "dashboards"
DASHBOARDS = sorted(DASH.glob("*.json"))
RULE_FILES = sorted(DASH.glob("*.rules.yml"))
RULE_TESTS = sorted((DASH / "tests").glob("*.yml"))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (scripts/bootstrap.sh)")

# Every series name the exporter serves, derived from the whole-exporter golden file (test_e2e_golden.py), not
# copied by hand: a family renamed or dropped there breaks the dashboards here.
EXPORTED = exported_names()
# Grafana's values for the test's substitution: any valid PromQL duration or regex will do for parsing.
GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def all_panels(dash: dict):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def data_panels(dash: dict):
    return [p for p in all_panels(dash) if p["type"] != "row"]


def resolve(expr: str, values: dict[str, str] | None = None) -> str:
    """Substitute Grafana variables: $x, ${x}, ${x:fmt}; template variables become a regex that matches all."""
    values = {**GRAFANA_VARS, **(values or {})}

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return values.get(name, ".*")
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def recorded_names() -> set[str]:
    names = set()
    for f in RULE_FILES:
        for g in yaml.safe_load(f.read_text())["groups"]:
            names |= {r["record"] for r in g["rules"] if "record" in r}
    return names


def alerting_rules() -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
            if "alert" in r]


def metric_names(expr: str) -> set[str]:
    # Identifiers followed by { [ ) or space that look like kvmnet metrics or recording rules.
    return set(re.findall(r"\b(kvmnet(?:_|:)[A-Za-z0-9_:]+)", expr))


# ---------------------------------------------------------------------------------------------------- JSON

def test_three_dashboards_exist():
    assert {p.name for p in DASHBOARDS} == {"kvmnet-overview.json", "kvmnet-bridge.json", "kvmnet-guest.json"}


def test_json_is_what_generate_py_writes():
    r = subprocess.run([sys.executable, str(DASH / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_importable(path):
    d = load(path)
    assert d["schemaVersion"] >= 39
    assert d["id"] is None, "an exported id makes import clash with an existing dashboard"
    assert re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"])
    assert d["title"].startswith("kvmnet")
    assert "__inputs" not in d, "the datasource is a template variable, not an import-time input"
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in all_panels(d):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_no_overlapping_panels(path):
    cells = {}
    for p in all_panels(load(path)):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_datasource_variable_used_everywhere(path):
    d = load(path)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, v["name"]
            assert v["definition"].startswith("label_values("), v["name"]
            assert v["query"]["query"] == v["definition"]
    for p in data_panels(d):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_template_variables(path):
    names = {v["name"] for v in load(path)["templating"]["list"]}
    assert {"datasource", "instance"} <= names
    if "overview" in path.name:
        assert {"netns", "bridge", "guest"} <= names
    if "bridge" in path.name:
        assert {"netns", "bridge", "device"} <= names
    if "guest" in path.name:
        assert "guest" in names


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_has_a_unit(path):
    for p in data_panels(load(path)):
        unit = p["fieldConfig"]["defaults"].get("unit")
        assert unit, f"panel {p['title']!r} has no unit"
        if p["type"] == "heatmap":
            assert p["options"]["yAxis"].get("unit"), p["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_variable_used_in_a_panel_is_defined(path):
    d = load(path)
    defined = {v["name"] for v in d["templating"]["list"]} | set(GRAFANA_VARS)
    for p in data_panels(d):
        for t in p["targets"]:
            used = {a or b for a, b in re.findall(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", t["expr"])}
            assert used <= defined, f"{p['title']!r}: undefined {used - defined}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_named_exists(path):
    """A panel that queries a name nobody exports is empty forever: the Node Exporter Full failure."""
    known = EXPORTED | recorded_names()
    d = load(path)
    exprs = [t["expr"] for p in data_panels(d) for t in p["targets"]]
    exprs += [v["definition"] for v in d["templating"]["list"] if v["type"] == "query"]
    for e in exprs:
        assert metric_names(e) <= known, f"unknown metric in {e!r}: {metric_names(e) - known}"


def test_guest_dashboard_shows_the_guests_view_of_its_tap():
    d = load(DASH / "kvmnet-guest.json")
    legends = [(t["legendFormat"], t["expr"]) for p in data_panels(d) for t in p["targets"]]
    rx = [e for lf, e in legends if lf.startswith("guest receive")]
    assert rx and all("kvmnet_port_transmit_" in e for e in rx), "guest receive must be the tap's transmit"
    tx = [e for lf, e in legends if lf.startswith("guest transmit")]
    assert tx and all("kvmnet_port_receive_" in e for e in tx), "guest transmit must be the tap's receive"


def test_issue_panels_present():
    """The panels issue 5 asks for, by kind."""
    types = {p.name: [q["type"] for q in data_panels(load(p))] for p in DASHBOARDS}
    assert "heatmap" in types["kvmnet-overview.json"] and "table" in types["kvmnet-overview.json"]
    assert "state-timeline" in types["kvmnet-bridge.json"]
    assert "heatmap" in types["kvmnet-guest.json"] and "state-timeline" in types["kvmnet-guest.json"]
    exprs = {p.name: " ".join(t["expr"] for q in data_panels(load(p)) for t in q["targets"]) for p in DASHBOARDS}
    assert "kvmnet_port_stp_state" in exprs["kvmnet-bridge.json"]
    assert "kvmnet_port_carrier_changes_total" in exprs["kvmnet-bridge.json"]
    assert "kvmnet_port_fdb_entries" in exprs["kvmnet-bridge.json"]
    assert "kvmnet_scrape_collector_success" in exprs["kvmnet-overview.json"]
    assert "kvmnet:guest_ping_loss:ratio_rate5m" in exprs["kvmnet-overview.json"]


# ---------------------------------------------------------------------------------------------------- PromQL

@needs_promtool
def test_every_query_parses(tmp_path):
    """promtool is the PromQL parser: each panel query and variable query, variables substituted, as a rule."""
    rules, where = [], []
    for path in DASHBOARDS:
        d = load(path)
        for p in data_panels(d):
            for t in p["targets"]:
                rules.append({"record": f"dashboard_query_{len(rules)}", "expr": resolve(t["expr"])})
                where.append(f"{path.name}: {p['title']} {t['refId']}")
        for v in d["templating"]["list"]:
            if v["type"] == "query":
                m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["definition"])
                assert m, v["definition"]
                rules.append({"record": f"dashboard_query_{len(rules)}", "expr": resolve(m.group(1))})
                where.append(f"{path.name}: variable {v['name']}")
    f = tmp_path / "dashboards.rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run([PROMTOOL, "check", "rules", str(f)], capture_output=True, text=True)
    if r.returncode != 0:  # find which: one query at a time
        bad = []
        for rule, w in zip(rules, where):
            f.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": [rule]}]}))
            one = subprocess.run([PROMTOOL, "check", "rules", str(f)], capture_output=True, text=True)
            if one.returncode != 0:
                bad.append(f"{w}: {rule['expr']}\n    {one.stdout.strip()} {one.stderr.strip()}")
        pytest.fail("promtool rejects dashboard queries:\n" + "\n".join(bad))
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout


# ---------------------------------------------------------------------------------------------------- rules

@needs_promtool
def test_promtool_check_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests():
    assert RULE_TESTS
    r = subprocess.run([PROMTOOL, "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True,
                       cwd=DASH / "tests")
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_annotated():
    rules = alerting_rules()
    assert len(rules) >= 10
    for r in rules:
        assert r["alert"].startswith("Kvmnet"), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        for key in ("summary", "description", "runbook_url"):  # runbooks: tests/unit/test_alerting.py
            assert r["annotations"].get(key), f"{r['alert']}: no {key}"
        assert r["annotations"].get("runbook") or r["annotations"].get("runbook_url"), f"{r['alert']}: no runbook"
        text = r["annotations"]["summary"] + r["annotations"]["description"]
        # Names what is wrong: a guest, a device, a bridge, a collector or the exporter instance.
        assert re.search(r"\$labels\.(guest|device|bridge|collector|instance)", text), r["alert"]


def test_every_alert_has_a_firing_and_a_quiet_promtool_case():
    fired, quiet = set(), set()
    for f in RULE_TESTS:
        for t in yaml.safe_load(f.read_text())["tests"]:
            for a in t.get("alert_rule_test", []):
                (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
    names = {r["alert"] for r in alerting_rules()}
    assert names <= fired, f"never shown firing: {names - fired}"
    # Quiet cases are either explicit empty expectations or the exact lists of a firing case (promtool compares
    # the whole list, so every neighbour series in that test is proven quiet).
    assert len(quiet) >= len(names) // 2


def test_every_alert_documented_in_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [r["alert"] for r in alerting_rules() if f"`{r['alert']}`" not in readme]
    assert not missing, f"README 'Dashboards and alerts' lacks: {missing}"
