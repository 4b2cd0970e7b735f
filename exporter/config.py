"""The exporter's YAML config file: strict pydantic models, errors as one line naming the field.

    netns: [lab-host]
    probe:
      interval: 1s
      timeout: 1s
      down_after: 3
      discover: true
      targets:
        - {name: g0, address: 10.99.0.3, netns: lab-host}

Unknown keys and wrong types are rejected (`probe.targets[3].address: not an IP address`). Durations are
Prometheus-style strings (`1s`, `500ms`, `2m`, `1m30s`) and become float seconds.
"""
from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from kvmnet.common import yamlfile

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:\d{1,12}(?:\.\d{1,9})?(?:ms|s|m|h|d))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
# A namespace name is a file name under /run/netns. Only these characters, so it can never carry a newline, NUL,
# '/', a quote or a space into a path, a log line or a label. fullmatch, not `$` (which matches before a final
# newline: "lab\n" passed).
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")

# Bounds (README "Failure behaviour"). Outside them the config is refused with one line naming the field.
INTERVAL_MIN, INTERVAL_MAX = 0.01, 3600.0   # below 10 ms (the send tick) the loop would only spin
TIMEOUT_MIN, TIMEOUT_MAX = 0.001, 60.0
DOWN_AFTER_MAX = 1000
TARGETS_MAX = 10000
NAME_MAX = 128
NETNS_MAX = 1000


class ConfigError(ValueError):
    """A bad config file; `str()` is one line naming the field."""


def parse_duration(value: Any) -> float:
    """'1s' -> 1.0, '500ms' -> 0.5, '1m30s' -> 90.0. Bare numbers are refused: say the unit."""
    if isinstance(value, bool) or not isinstance(value, str) or not _DURATION.fullmatch(value.strip()):
        raise ValueError(f"not a duration (use 1s, 500ms, 2m): {value!r}")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(value.strip()))


def _ip(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr = value
    else:
        try:
            addr = ipaddress.ip_address(value if isinstance(value, str) else "")
        except ValueError:
            raise ValueError(f"not an IP address: {value!r}") from None
    if not is_unicast(addr):
        raise ValueError(f"not a unicast address without a zone: {value!r}")
    return addr


def is_unicast(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A probe target: one host. Not multicast, broadcast or unspecified (one echo request, many or no
    replies), no IPv6 zone (`%eth0`: which link is the namespace's business, not a URL's)."""
    if addr.is_multicast or addr.is_unspecified or getattr(addr, "scope_id", None):
        return False
    return addr != ipaddress.IPv4Address("255.255.255.255")


def check_netns_name(value: str) -> str:
    if not isinstance(value, str) or not _NETNS_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"not a namespace name (1-255 of A-Z a-z 0-9 _ . -; not . or ..): {value[:64]!r}")
    return value


def _check_name(value: str) -> str:
    if not value.isprintable() or len(value) > NAME_MAX or value != value.strip():
        raise ValueError(f"not a name (1-{NAME_MAX} printable characters, no surrounding space): {value[:64]!r}")
    return value


NetnsName = Annotated[str, AfterValidator(check_netns_name)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
IPAddress = Annotated[ipaddress.IPv4Address | ipaddress.IPv6Address, BeforeValidator(_ip)]
_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class Target(BaseModel):
    model_config = _STRICT
    name: Annotated[str, Field(min_length=1), AfterValidator(_check_name)]
    address: IPAddress
    netns: str | None = None  # None: resolved by the exporter (see resolve_target_netns)

    @field_validator("netns")
    @classmethod
    def _netns(cls, v: str | None) -> str | None:
        return v if v in (None, "") else check_netns_name(v)


class ProbeConfig(BaseModel):
    model_config = _STRICT
    interval: Duration = 1.0
    timeout: Duration = 1.0
    down_after: int = Field(default=3, ge=1, le=DOWN_AFTER_MAX)
    discover: bool = True
    targets: list[Target] = Field(default=[], max_length=TARGETS_MAX)

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: float) -> float:
        return _within(v, INTERVAL_MIN, INTERVAL_MAX)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float) -> float:
        return _within(v, TIMEOUT_MIN, TIMEOUT_MAX)


def _within(v: float, lo: float, hi: float) -> float:
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"must be from {_human(lo)} to {_human(hi)}")
    return v


def _human(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


class Config(BaseModel):
    model_config = _STRICT
    netns: list[NetnsName] = Field(default=[], max_length=NETNS_MAX)
    probe: ProbeConfig = ProbeConfig()

    @field_validator("netns")
    @classmethod
    def _dedupe(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


def from_dict(data: Any) -> Config:
    """Validate already-parsed YAML; raise ConfigError naming the first bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"(top level): must be a mapping of keys, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(yamlfile.describe(exc)) from None


def load_config(path: str) -> Config:
    """Read and validate a config file. Every problem is a ConfigError with one line naming the field."""
    data = yamlfile.read_yaml(path, ConfigError)
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None  # which file, too: --web.config.file is another


def resolve_target_netns(target: Target, watched: list[str]) -> str:
    """Where to ping a target from: its own `netns`, else the one watched namespace, else the exporter's own."""
    if target.netns is not None:
        return target.netns
    named = [n for n in dict.fromkeys(watched) if n]
    return named[0] if len(named) == 1 else ""
