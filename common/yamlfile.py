"""YAML files written by people: read them, and turn validation errors into one line that names the field.

Shared by the lab file (`common/lab.py`) and the exporter's config (`kvmnet.exporter.config`), so an operator sees the
same shape of error from both tools:

    guests[1].mac: not a MAC address: '0a:zz'
    probe.targets[0].address: required
    probe.down_after: input should be a valid integer, got str
    /etc/kvmnet.yml:3:7: invalid YAML: found unexpected end of stream
"""
from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import ValidationError

# pydantic reports these with a message that does not show the value, which is the first thing a reader wants.
_SHOW_INPUT = {"literal_error", "bool_parsing", "int_parsing", "float_parsing", "greater_than", "greater_than_equal",
               "less_than", "less_than_equal", "int_from_float", "enum"}


def read_yaml(path: Any, error: type[Exception]) -> Any:
    """The parsed document; unreadable files and invalid YAML raise `error` with one line naming file and place."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where}: invalid YAML: {problem}") from None


def field_path(loc: tuple) -> str:
    """pydantic's error location as the path a person would write: `probe.targets[3].address`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "lax-", "json-")) or part in ("str", "int", "IPv4Address"):
            continue  # pydantic's union/validator branch names, not fields
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _message(err: dict) -> str:
    kind, msg, inp = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    msg = msg.removeprefix("Value error, ")
    if kind.endswith("_type") or kind == "model_type":
        msg = re.sub(r" or instance of \w+", "", msg)
        msg += ", got nothing" if inp is None else f", got {type(inp).__name__}"
    elif kind in _SHOW_INPUT and not isinstance(inp, (dict, list)):
        msg += f": {inp!r}"
    return msg[:1].lower() + msg[1:] if msg.startswith("Input ") else msg


def describe(exc: ValidationError) -> str:
    """One line for the first error, naming its field; how many more there are, if any."""
    errs = exc.errors()
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{field_path(errs[0]['loc'])}: {_message(errs[0])}{more}"
