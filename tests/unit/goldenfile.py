"""The golden file of the whole-exporter tier (tests/unit/test_e2e_golden.py writes and checks it) and what is
derived from it: the list of exported families and series names that the dashboard and docs tests use."""
from __future__ import annotations

import re
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden" / "e2e-output.prom"


def golden_families() -> dict[str, str]:
    """{family name: type} from the golden file's TYPE lines."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", GOLDEN.read_text(), re.M))


def exported_names() -> set[str]:
    """Every series name the exporter serves, derived from the golden file: a histogram brings _bucket/_sum/_count.
    tests/unit/test_dashboards.py checks the dashboards' queries against this."""
    out = set()
    for name, kind in golden_families().items():
        out |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    return out


def golden_labels() -> dict[str, set[str]]:
    """{family: label names} over the golden file's samples (without `le`); families without samples are absent."""
    fams = golden_families()
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(\{[^\n]*\})? \S+$", GOLDEN.read_text(), re.M):
        name = m.group(1)
        if name not in fams:
            name = re.sub(r"_(bucket|sum|count)$", "", name)
        out.setdefault(name, set()).update(re.findall(r'(\w+)="', m.group(2) or "") or [])
    for v in out.values():
        v.discard("le")
    return out
