"""logfmt: quoting values and reading `key=value` messages back. The exporter's log lines and the prober's events
are written with it; setup may use it too, so it lives here rather than in the exporter."""
from __future__ import annotations

import re

_PAIR = re.compile(r"""\s*([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S*)""")


def quote(value: object) -> str:
    """A logfmt value: bare when it is one plain word, else double-quoted with escapes."""
    s = str(value)
    if s and not any(c in s for c in ' ="\\\n\t') and s.isprintable():
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def fmt(name: str, **fields: object) -> str:
    return " ".join([f"event={quote(name)}", *(f"{k}={quote(v)}" for k, v in fields.items())])


def parse_logfmt(text: str) -> dict[str, str] | None:
    """The key=value pairs of a message, or None if it is not logfmt all the way through."""
    out: dict[str, str] = {}
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _PAIR.match(text, pos)
        if not m or m.end() == pos:
            return None
        v = m.group(2)
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
            v = re.sub(r"\\(.)", lambda x: "\n" if x.group(1) == "n" else x.group(1), v[1:-1])
        out[m.group(1)] = v
        pos = m.end()
    return out or None
