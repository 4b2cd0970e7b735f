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

import logging
import math
import re
from collections.abc import Callable, Iterable
from functools import lru_cache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = logging.getLogger("kvmnet.exposition")

# Label values: what a name becomes (the documented mapping, README "Odd names").
# Names are bytes to the kernel (device names need not be UTF-8) and reach us decoded with surrogateescape. A label
# value is that name with
#   - a byte that is not part of valid UTF-8 -> the 4 characters \xNN (lower-case hex): b"br\xff" -> `br\xff`
#   - a control character (U+0000-U+001F, U+007F) -> \xNN too: no newline, tab or escape code in a label
#   - any other lone surrogate (not from bytes) -> \uNNNN
#   - a backslash -> two backslashes, so the escapes above never collide with a name that is literally `\xff`
# Every other character is kept. The mapping is injective: two different names never share a series. The text
# format's own escaping (\\, \", \n) is applied on top of it when rendering.
_ODD = re.compile(r"[\\\x00-\x1f\x7f\ud800-\udfff]")


def _odd(m: re.Match[str]) -> str:
    c = m.group()
    if c == "\\":
        return "\\\\"
    o = ord(c)
    if o < 0x80:
        return f"\\x{o:02x}"
    if 0xDC80 <= o <= 0xDCFF:  # surrogateescape'd byte
        return f"\\x{o - 0xDC00:02x}"
    return f"\\u{o:04x}"


def label_value(name: str) -> str:
    """A name (str, possibly surrogateescape'd bytes) as the label value it is exported as (see above)."""
    return _ODD.sub(_odd, name)


def label_value_of_bytes(raw: bytes) -> str:
    """The label value of a name given as the kernel's bytes."""
    return label_value(raw.decode("utf-8", "surrogateescape"))


def _escape(value: str) -> str:
    return label_value(value).replace("\\", r"\\").replace('"', r"\"")


@lru_cache(maxsize=1024)
def _escape_small(value: str) -> str:  # le="..." of every histogram bucket, every scrape: a handful of values
    return _escape(value)


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
    extra = f'{name}="{_escape_small(value)}"'
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

    __slots__ = ("name", "kind", "help", "lines", "error")

    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help
        self.lines: list[str] = []
        self.error = ""  # set by a sample that is not a number: render() drops the family and reports it

    def add(self, rendered_labels: str, value: float | int) -> None:
        try:
            self.lines.append(f"{self.name}{rendered_labels} {format_value(value)}")
        except (TypeError, ValueError) as exc:
            self.error = f"sample{rendered_labels}: not a number: {value!r} ({exc})"

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


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_KINDS = ("counter", "gauge", "histogram", "summary", "untyped")


def render(families: Iterable[MetricFamily], on_error: Callable[[str, str], None] | None = None) -> bytes:
    """Render families; those sharing a name (one per watched namespace) are merged under one HELP/TYPE.

    Order is kept as given: collectors emit in sorted order, and callers pass namespaces sorted. A family with
    no samples still gets its HELP/TYPE lines.

    A family that cannot be rendered (a bad name or kind, the same name with two kinds, text that is not
    encodable) is dropped and the rest served, as node_exporter's ContinueOnError: `on_error(family, reason)` is
    called for it (web.py counts it in kvmnet_scrape_render_errors_total and logs it); without `on_error` it raises
    ValueError.
    """
    merged: dict[str, tuple[MetricFamily, list[str]]] = {}
    bad: dict[str, str] = {}
    for fam in families:
        seen = merged.get(fam.name)
        if fam.name in bad:
            continue
        if getattr(fam, "error", ""):
            bad[str(fam.name)] = fam.error
            merged.pop(fam.name, None)
            continue
        if seen is None:
            if not isinstance(fam.name, str) or not _NAME.match(fam.name) or fam.kind not in _KINDS:
                bad[str(fam.name)] = f"bad metric name or type: {fam.name!r} {fam.kind!r}"
                continue
            merged[fam.name] = (fam, list(fam.lines))
        elif seen[0].kind != fam.kind:
            bad[fam.name] = f"metric {fam.name} is both {seen[0].kind} and {fam.kind}"
            del merged[fam.name]
        else:
            seen[1].extend(fam.lines)
    out: list[bytes] = []
    for fam, lines in merged.values():
        try:
            block = "\n".join([f"# HELP {fam.name} {_escape_help(fam.help)}", f"# TYPE {fam.name} {fam.kind}",
                               *lines, ""])
            out.append(block.encode())
        except Exception as exc:  # noqa: BLE001 - one unrenderable family must not sink the scrape
            bad[fam.name] = f"{type(exc).__name__}: {exc}"
    for name, reason in bad.items():
        if on_error is None:
            raise ValueError(reason)
        on_error(name, reason)
    return b"".join(out)


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")
