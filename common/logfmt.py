"""logfmt: quoting values and reading `key=value` messages back. The exporter's log lines and the prober's events
are written with it; setup may use it too, so it lives here rather than in the exporter."""
from __future__ import annotations

import re

_PAIR = re.compile(r"""\s*([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S*)""")


# Inside quotes: backslash and quote escaped, newline as \n, every other control character and every byte that was
# not UTF-8 (a surrogateescape'd device name) as \xNN, other lone surrogates as \uNNNN. A log line is always one
# line of valid UTF-8, whatever a device, guest or namespace is called.
_ESC = re.compile(r'[\\"\x00-\x1f\x7f\ud800-\udfff]')


def _esc(m: re.Match[str]) -> str:
    c = m.group()
    if c in '\\"':
        return "\\" + c
    if c == "\n":
        return "\\n"
    o = ord(c)
    if o < 0x80:
        return f"\\x{o:02x}"
    return f"\\x{o - 0xDC00:02x}" if 0xDC80 <= o <= 0xDCFF else f"\\u{o:04x}"


def quote(value: object) -> str:
    """A logfmt value: bare when it is one plain word, else double-quoted with escapes."""
    s = str(value)
    if s and not any(c in s for c in ' ="\\') and s.isprintable():
        return s
    return '"' + _ESC.sub(_esc, s) + '"'


_CTRL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def sanitize(line: str) -> str:
    """The last guard on a whole log line: control characters and undecodable bytes left by a bare `%s` become
    \\xNN (as in quote()), so one odd name can never split a line or make it invalid UTF-8."""
    return _CTRL.sub(_esc, line) if _CTRL.search(line) else line


def _unesc(m: re.Match[str]) -> str:
    c: str = m.group(1)
    if c == "n":
        return "\n"
    if c[0] in "xu" and len(c) > 1:
        o = int(c[1:], 16)
        return chr(o + 0xDC00) if c[0] == "x" and o >= 0x80 else chr(o)
    return c


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
            v = re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)", _unesc, v[1:-1])
        out[m.group(1)] = v
        pos = m.end()
    return out or None
