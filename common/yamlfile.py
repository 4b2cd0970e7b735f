"""YAML files written by people: read them defensively, and turn validation errors into one line that names the field.

Shared by the lab file (`common/lab.py`), the exporter's config (`kvmnet.exporter.config`) and its web config
(`kvmnet.exporter.webconfig`), so an operator sees the same shape of error from all three:

    guests[1].mac: not a MAC address: '0a:zz'
    probe.targets[0].address: required
    /etc/kvmnet.yml:3:7: invalid YAML: found unexpected end of stream
    /etc/kvmnet.yml: not a regular file (a FIFO)
    /etc/kvmnet.yml:2:1: invalid YAML: duplicate key 'probe' (also on line 1)

A file is refused before it is parsed unless it is a regular file of at most MAX_BYTES, valid UTF-8, without
control characters; while parsing, nesting deeper than MAX_DEPTH and aliases that would expand to more than
MAX_ALIAS_NODES nodes in all (a "billion laughs" bomb) are refused, as are duplicate keys (YAML says keys are unique;
PyYAML would silently keep the last one). Nothing here blocks: the file is opened with O_NONBLOCK and checked with
fstat() before a byte is read, so a FIFO, /dev/zero or a terminal is refused at once.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

MAX_BYTES = 1 << 20          # 1 MiB: a lab of thousands of guests is ~100 KiB
MAX_DEPTH = 64               # no schema here nests deeper than ~6
MAX_ALIAS_NODES = 10_000     # nodes that aliases may add by expansion, over the whole document
MAX_NODES = 50_000           # nodes in all (after expansion): ~4000 guests; keeps every failure well under a second

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
# What YAML calls non-printable (PyYAML's Reader.NON_PRINTABLE): C0 controls but tab/LF/CR, DEL, C1 but NEL, ...
_CONTROL = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

# pydantic reports these with a message that does not show the value, which is the first thing a reader wants.
_SHOW_INPUT = {"literal_error", "bool_parsing", "int_parsing", "float_parsing", "greater_than", "greater_than_equal",
               "less_than", "less_than_equal", "int_from_float", "enum"}

# libyaml: 4x faster; the same errors and results
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Refused(yaml.YAMLError):
    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


def read_text(path: Any, error: type[Exception], max_bytes: int = MAX_BYTES) -> str:
    """The file's text, if it is a regular file of at most max_bytes of UTF-8; else `error` with one line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError:  # an embedded NUL byte
        raise error(f"{path!r}: cannot read: not a valid file name") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a file")
            raise error(f"{path}: not a regular file ({kind})")
        if st.st_size > max_bytes:
            raise error(f"{path}: too large: {st.st_size} bytes (at most {max_bytes})")
        chunks, n = [], 0
        while n <= max_bytes:  # the file may grow while read: never take more than the cap
            chunk = os.read(fd, max_bytes + 1 - n)
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > max_bytes:
            raise error(f"{path}: too large: more than {max_bytes} bytes")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {exc.start}: {data[exc.start]:#04x})") from None
    m = _CONTROL.search(text)
    if m:
        line = text.count("\n", 0, m.start()) + 1
        raise error(f"{path}:{line}: control character {m.group()!r} (not a text file?)")
    return text


def _prescan(text: str) -> None:
    """Walk the parser's events once (libyaml, no objects built): refuse deep nesting and alias bombs before the
    composer recurses into them (it recurses per level, and a document is 1 MiB of '[' at most)."""
    loader = _Loader(text)
    try:
        sizes: dict[str, int] = {}      # anchor -> nodes in its (expanded) subtree
        stack: list[list[Any]] = []           # open collections: [anchor, nodes so far]
        expanded = total = 0
        while loader.check_event():
            ev = loader.get_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                if len(stack) >= MAX_DEPTH:
                    raise _Refused(f"nested deeper than {MAX_DEPTH} levels", ev.start_mark)
                stack.append([ev.anchor, 1])
                if ev.anchor:
                    sizes.pop(ev.anchor, None)  # still open: an alias to it now would be recursive
                continue
            if isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, n = stack.pop()
            elif isinstance(ev, yaml.ScalarEvent):
                anchor, n = ev.anchor, 1
            elif isinstance(ev, yaml.AliasEvent):
                if ev.anchor not in sizes:
                    raise _Refused(f"alias *{ev.anchor} refers to an unknown or enclosing anchor", ev.start_mark)
                anchor, n = None, sizes[ev.anchor]
                expanded += n
                if expanded > MAX_ALIAS_NODES:
                    raise _Refused(f"aliases expand to more than {MAX_ALIAS_NODES} nodes (an alias bomb?)",
                                   ev.start_mark)
            else:
                continue
            if anchor:
                sizes[anchor] = n
            total += 1 if not isinstance(ev, yaml.AliasEvent) else n
            if total > MAX_NODES:
                raise _Refused(f"more than {MAX_NODES} values", ev.start_mark)
            if stack:
                stack[-1][1] += n
    finally:
        loader.dispose()


class _UniqueKeys(_Loader):  # type: ignore[valid-type,misc]  # C or Python loader, chosen at import
    """Duplicate mapping keys are an error (merge keys `<<:` may still be overridden, as YAML intends)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _Refused(f"duplicate key {key!r} (also on line {seen[key] + 1})", key_node.start_mark)
                    seen[key] = key_node.start_mark.line
                except TypeError:
                    pass  # unhashable: the constructor says so below
        return super().construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor("tag:yaml.org,2002:map", _UniqueKeys.construct_yaml_map)


def parse_yaml(text: str, path: Any, error: type[Exception]) -> Any:
    """The one document in `text`; any YAML problem raises `error` with one line naming file and place."""
    try:
        _prescan(text)
        loader = _UniqueKeys(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc).splitlines()[0]
        if "maximum nesting depth" in str(problem):  # libyaml's own limit (1000), met while it scans ahead
            problem = f"nested deeper than {MAX_DEPTH} levels"
        raise error(f"{where}: invalid YAML: {_oneline(str(problem))}") from None
    except RecursionError:  # not reached with MAX_DEPTH, but never a traceback
        raise error(f"{path}: invalid YAML: nested too deep") from None


def _oneline(s: str) -> str:
    return " ".join(s.split())[:200]


def read_yaml(path: Any, error: type[Exception]) -> Any:
    """The parsed document; unreadable files and invalid YAML raise `error` with one line naming file and place."""
    return parse_yaml(read_text(path, error), path, error)


def field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as the path a person would write: `probe.targets[3].address`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "lax-", "json-")) or part in ("str", "int", "IPv4Address"):
            continue  # pydantic's union/validator branch names, not fields
        else:
            out += ("." if out else "") + _oneline(repr(part) if not isinstance(part, str) or not part.isprintable()
                                                   else part)
    return out or "(top level)"


def _message(err: ErrorDetails) -> str:
    kind, msg, inp = err["type"], str(err["msg"]), err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    msg = msg.removeprefix("Value error, ")
    if kind.endswith("_type") or kind == "model_type":
        msg = re.sub(r" or instance of \w+", "", msg)
        msg += ", got nothing" if inp is None else f", got {type(inp).__name__}"
    elif kind in _SHOW_INPUT and not isinstance(inp, (dict, list)):
        msg += f": {_oneline(repr(inp))}"
    msg = _oneline(msg)
    return msg[:1].lower() + msg[1:] if msg.startswith("Input ") else msg


def describe(exc: ValidationError) -> str:
    """One line for the first error, naming its field; how many more there are, if any."""
    errs = exc.errors()
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{field_path(errs[0]['loc'])}: {_message(errs[0])}{more}"
