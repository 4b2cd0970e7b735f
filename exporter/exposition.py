"""Prometheus text exposition (format 0.0.4), written directly.

client_python's `generate_latest` costs ~120 ms for 15k samples on these machines (DESIGN.md); a scrape of
1000 taps has ~20k. Here a collector adds samples with a label string rendered once per label set and cached
(`labels()`), so a scrape is string joins. The data model is still client_python's custom-collector one:
every scrape builds fresh families from a fresh snapshot, so a vanished tap vanishes from the output.

    fam = MetricFamily("kvmnet_port_up", "gauge", "Carrier (IFF_LOWER_UP) of a bridge port.")
    fam.add(labels(netns="lab", bridge="br0", device="vm1eth0"), 1)
    render([fam])  # b'# HELP kvmnet_port_up ...\\n# TYPE kvmnet_port_up gauge\\nkvmnet_port_up{...} 1\\n'
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


# Bounded so tap churn (new names every minute) cannot grow memory without limit: 2^15 label sets is ~20 MiB and
# 8x what a host with 1000 taps and 1000 guests uses (bench/results/soak.md measured the 2^17 plateau at +80 MiB).
@lru_cache(maxsize=1 << 15)
def _render_pairs(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs) + "}"


def labels(**kw: object) -> str:
    """Render a label set once: `labels(netns="a", device="b")` -> '{netns="a",device="b"}'. Cached."""
    return _render_pairs(tuple((k, "" if v is None else str(v)) for k, v in kw.items()))


def with_label(rendered: str, name: str, value: str) -> str:
    """Append one label to a rendered label string: '{a="1"}' + le="0.5" -> '{a="1",le="0.5"}'."""
    extra = f'{name}="{_escape(value)}"'
    return "{" + extra + "}" if not rendered else rendered[:-1] + "," + extra + "}"


def format_value(value: float | int) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class MetricFamily:
    """One metric family. `kind` is counter, gauge, histogram or untyped; counters carry `_total` in `name`."""

    __slots__ = ("name", "kind", "help", "lines")

    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help
        self.lines: list[str] = []

    def add(self, rendered_labels: str, value: float | int) -> None:
        self.lines.append(f"{self.name}{rendered_labels} {format_value(value)}")

    def add_histogram(self, rendered_labels: str, bounds: Iterable[float], cumulative_counts: Iterable[int],
                      total: float, count: int) -> None:
        """Bucket upper bounds (without +Inf) with their cumulative counts, then _sum and _count."""
        n = self.name
        for bound, c in zip(bounds, cumulative_counts):
            self.lines.append(f"{n}_bucket{with_label(rendered_labels, 'le', format_value(float(bound)))} {c}")
        self.lines.append(f"{n}_bucket{with_label(rendered_labels, 'le', '+Inf')} {count}")
        self.lines.append(f"{n}_sum{rendered_labels} {format_value(float(total))}")
        self.lines.append(f"{n}_count{rendered_labels} {count}")

    def __repr__(self) -> str:
        return f"MetricFamily({self.name!r}, {self.kind!r}, {len(self.lines)} lines)"


def render(families: Iterable[MetricFamily]) -> bytes:
    """Render families; those sharing a name (one per watched namespace) are merged under one HELP/TYPE.

    Order is kept as given: collectors emit in sorted order, and callers pass namespaces sorted. A family with
    no samples still gets its HELP/TYPE lines.
    """
    merged: dict[str, tuple[MetricFamily, list[str]]] = {}
    for fam in families:
        seen = merged.get(fam.name)
        if seen is None:
            merged[fam.name] = (fam, list(fam.lines))
        elif seen[0].kind != fam.kind:
            raise ValueError(f"metric {fam.name} is both {seen[0].kind} and {fam.kind}")
        else:
            seen[1].extend(fam.lines)
    out: list[str] = []
    for fam, lines in merged.values():
        out.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        out.extend(lines)
    out.append("")
    return "\n".join(out).encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")
