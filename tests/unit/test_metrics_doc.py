"""docs/metrics.md against the whole-exporter golden file: every family served is documented with its type and
labels, and nothing documented is missing from what is served (except rows marked *conditional*)."""
from __future__ import annotations

import re
from pathlib import Path

from .goldenfile import golden_families, golden_labels

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `([a-zA-Z_:][\w:]*)` \| (\w+) \|([\w, ]*)\| (.*) \|$")


def documented() -> dict[str, tuple[str, set[str], bool]]:
    """{family: (type, labels, conditional)} of the /metrics sections (the /probe section is left out)."""
    text = DOC.read_text().split("\n## Served on `/probe")[0]
    out = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            name, kind, lbl, meaning = m.groups()
            assert name not in out, f"{name} documented twice"
            out[name] = (kind, {l.strip() for l in lbl.split(",") if l.strip()}, "*conditional*" in meaning)
    return out


def test_every_served_family_is_documented():
    doc = documented()
    missing = [f for f in golden_families() if f not in doc]
    assert not missing, f"add to docs/metrics.md: {missing}"


def test_nothing_documented_is_absent():
    served = golden_families()
    absent = [f for f, (_k, _l, cond) in documented().items() if f not in served and not cond]
    assert not absent, f"documented but not served (mark *conditional* if it only appears sometimes): {absent}"


def test_types_and_labels_match():
    doc, labels = documented(), golden_labels()
    for name, kind in golden_families().items():
        assert doc[name][0] == kind, f"{name}: documented as {doc[name][0]}, served as {kind}"
        if name in labels:  # families whose samples the skip rule hides have no labels to compare
            assert doc[name][1] == labels[name], f"{name}: documented labels {sorted(doc[name][1])}, " \
                                                 f"served {sorted(labels[name])}"
