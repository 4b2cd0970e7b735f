"""Logging: `ts=... level=info event=NAME key=value` (logfmt), or one JSON object per line.

Modules log either with `event(log, "name", key=value)`, which quotes values properly, or with a plain
`log.info("event=name key=%s", value)` message; both formats read the message as logfmt, so JSON output gets
the same keys. A message that is not logfmt becomes `msg="..."`.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

from kvmnet.common.logfmt import fmt, parse_logfmt, quote, sanitize  # noqa: F401 - re-exported: logs.quote etc.

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("logfmt", "json")


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one event: `event(log, "listening", address=":9848")`."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", fmt(name, **fields))


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _level(record: logging.LogRecord) -> str:
    return {"WARNING": "warn", "CRITICAL": "error"}.get(record.levelname, record.levelname.lower())


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        body = msg if parse_logfmt(msg) is not None else f"msg={quote(msg)}"
        line = f"ts={_ts(record)} level={_level(record)} logger={record.name} {body}"
        if record.exc_info:
            line += " exc=" + quote(self.formatException(record.exc_info))
        return sanitize(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        obj: dict[str, object] = {"ts": _ts(record), "level": _level(record), "logger": record.name}
        obj.update(parse_logfmt(msg) or {"msg": msg})
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


class _BadRequestFilter(logging.Filter):
    """aiohttp logs a malformed request (garbage bytes, a 100 KB header) as an error with a traceback. It is the
    client's fault and already answered 400: one warning line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        try:
            from aiohttp.http_exceptions import HttpProcessingError
        except ImportError:  # pragma: no cover
            return True
        if isinstance(exc, (HttpProcessingError, ConnectionError)):
            peer = record.getMessage().rpartition(" from ")[2]
            text = str(getattr(exc, "message", "") or exc).strip().splitlines() or [type(exc).__name__]
            record.msg, record.args = "%s", (fmt("bad_request", client=peer, error=text[0][:120]),)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def setup(level: str = "info", format: str = "logfmt", stream: TextIO | None = None) -> None:
    """Configure the root logger once (stderr by default). aiohttp's access log stays quiet below debug."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else LogfmtFormatter())
    handler._kvmnet = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_kvmnet", False):  # ours from an earlier setup(); leave others' (pytest's) alone
            root.removeHandler(h)
    handler.addFilter(_BadRequestFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.getLogger("pyroute2").setLevel(logging.WARNING if level != "debug" else logging.DEBUG)
