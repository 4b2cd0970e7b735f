"""Alerts as the on-call engineer meets them: every alert follows the monitoring-mixins conventions (a severity of
critical/warning/info, a static summary, a templated description, a runbook_url into docs/runbook.md whose anchor
exists), and the shipped Alertmanager config passes `amtool check-config` and routes by severity.

A new alert in any dashboards/*.rules.yml fails here until it has all of that. What Alertmanager does with real
alerts (grouping, inhibitions) is proven by tests/e2e/test_alertmanager_inhibit.py and test_alerting_live.py.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "dashboards").glob("*.rules.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
AM_CONFIG = ROOT / "deploy" / "alertmanager.yml"
RUNBOOK_BASE = "https://github.com/kvmnet/kvmnet/blob/main/docs/runbook.md#"
# Not optional: scripts/bootstrap.sh installs prometheus-alertmanager, which brings amtool.
AMTOOL = shutil.which("amtool")
RUN_STATE_ALERTS = {"KvmnetGuestPaused", "KvmnetGuestStopped"}


def alerts() -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
            if "alert" in r]


def runbook_sections() -> dict[str, str]:
    """`## Name` heading -> the section's text (GitHub's anchor for it is the lower-cased name)."""
    parts = re.split(r"^## (\S+)\s*$", RUNBOOK.read_text(), flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


ALERTS = alerts()


def test_there_are_alerts():
    assert len(ALERTS) >= 17


@pytest.mark.parametrize("rule", ALERTS, ids=lambda r: r["alert"])
def test_alert_follows_the_mixin_conventions(rule):
    name, ann = rule["alert"], rule.get("annotations", {})
    assert rule.get("labels", {}).get("severity") in ("critical", "warning", "info"), name
    assert ann.get("summary") and "{{" not in ann["summary"], f"{name}: summary must be static text"
    assert ann.get("description") and "$labels" in ann["description"], f"{name}: description must be templated"
    assert ann.get("runbook_url") == RUNBOOK_BASE + name.lower(), f"{name}: runbook_url"
    assert "runbook" not in ann, f"{name}: the runbook text lives in docs/runbook.md"


@pytest.mark.parametrize("rule", ALERTS, ids=lambda r: r["alert"])
def test_alert_has_a_runbook_section(rule):
    sections = runbook_sections()
    assert rule["alert"] in sections, f"docs/runbook.md has no '## {rule['alert']}'"
    text = sections[rule["alert"]]
    for part in ("**Meaning.**", "**Confirm by hand.**", "**What to do.**"):
        assert part in text, f"{rule['alert']}: runbook section lacks {part}"
    # Confirmation by hand means commands an operator can type.
    assert re.search(r"`(ip|bridge|virsh|ping|curl|tc|ethtool|tcpdump|journalctl|systemctl)\b", text), rule["alert"]


def test_no_runbook_section_without_an_alert():
    """Stale sections mislead. KvmnetGuestPaused and KvmnetGuestStopped come with the guest run-state work
    (issue 13, branch stacks); their sections are here so that the inhibitions can name them."""
    extra = set(runbook_sections()) - {r["alert"] for r in ALERTS} - RUN_STATE_ALERTS
    assert not extra, extra


def test_amtool_check_config():
    assert AMTOOL, "amtool missing: scripts/bootstrap.sh installs prometheus-alertmanager"
    r = subprocess.run([AMTOOL, "check-config", str(AM_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.parametrize("labels,receiver", [
    ({"alertname": "KvmnetGuestDown", "severity": "critical"}, "kvmnet-page"),
    ({"alertname": "KvmnetTapCarrierLost", "severity": "critical"}, "kvmnet-page"),
    ({"alertname": "KvmnetExporterDown", "severity": "critical"}, "kvmnet-page"),
    ({"alertname": "KvmnetPortDropsRising", "severity": "warning"}, "kvmnet-ticket"),
    ({"alertname": "KvmnetGuestPaused", "severity": "warning"}, "kvmnet-ticket"),
    ({"alertname": "KvmnetGuestStopped", "severity": "info"}, "kvmnet-info"),
])
def test_routes(labels, receiver):
    assert AMTOOL
    r = subprocess.run([AMTOOL, "config", "routes", "test", f"--config.file={AM_CONFIG}",
                        *(f"{k}={v}" for k, v in labels.items())], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == receiver


def test_inhibitions_name_real_alerts():
    """Every alert name an inhibit rule matches exists in the rules (or is one of RUN_STATE_ALERTS, see above)."""
    names = {r["alert"] for r in ALERTS} | RUN_STATE_ALERTS
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    for i, rule in enumerate(cfg["inhibit_rules"]):
        for side in ("source_matchers", "target_matchers"):
            for m in rule[side]:
                k, op, v = re.fullmatch(r'(\w+)(=~|!=|=)"(.*)"', m).groups()
                if k == "alertname" and op in ("=", "=~"):
                    hit = {n for n in names if re.fullmatch(v, n)}
                    assert hit, f"inhibit_rules[{i}].{side}: {m} matches no alert"


def test_severities_used_by_routes_exist():
    used = {r["labels"]["severity"] for r in ALERTS}
    assert {"critical", "warning"} <= used
