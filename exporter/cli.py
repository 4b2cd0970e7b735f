"""`kvmnet-exporter`: flags in the Prometheus style, then serve.

    kvmnet-exporter --netns seed-host                      # own namespace + seed-host, port 9848
    kvmnet-exporter --config.file kvmnet.yml --config.check
    kvmnet-exporter --lab examples/seed-lab.yaml --no-collector.probe --device.exclude '^veth'

Bad flags or a bad config: one line naming the field on stderr, exit 2, no traceback.
"""
from __future__ import annotations

import argparse
import logging
import platform
import re
import signal
import sys

from . import DEFAULT_PORT, __version__, logs
from .collectors.probe import GuestCollector
from .config import ConfigError, check_netns_name
from .prober.engine import GuestProber
from .service import COLLECTORS, Service, Settings, load

log = logging.getLogger("kvmnet.cli")

PROG = "kvmnet-exporter"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        raise UsageError(message)


def parse_listen(value: str) -> tuple[str | None, int]:
    """':9848' -> (None, 9848) (all addresses); '127.0.0.1:9848'; '[::1]:9848'."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {value[:300]!r}")
    if len(host) > 255 or not all(c.isascii() and c.isprintable() and not c.isspace() for c in host):
        raise argparse.ArgumentTypeError(f"not a host name or address: {host[:64]!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"IPv6 addresses need brackets, as [::1]:{port}: {value!r}")
    return (host or None), int(port)


REGEX_MAX = 1024  # characters: device names are at most 15 bytes, a longer pattern is a mistake


def _regex(value: str) -> re.Pattern:
    if len(value) > REGEX_MAX:
        raise argparse.ArgumentTypeError(f"regular expression longer than {REGEX_MAX} characters")
    try:
        return re.compile(value)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression: {value!r}: {exc}") from None


def _netns(value: str) -> str:
    try:
        return check_netns_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Prometheus exporter for Linux bridges, taps and the KVM/QEMU guests "
                                       "behind them.")
    p.add_argument("--web.listen-address", dest="listen", type=parse_listen, default=(None, DEFAULT_PORT),
                   metavar="HOST:PORT", help=f"address to listen on (default :{DEFAULT_PORT})")
    p.add_argument("--web.config.file", dest="web_config", metavar="FILE",
                   help="TLS and basic auth, in the Go exporters' web config format")
    p.add_argument("--web.enable-lifecycle", dest="lifecycle", action="store_true",
                   help="allow POST /-/reload (as Prometheus; SIGHUP reloads either way)")
    p.add_argument("--config.file", dest="config_file", metavar="FILE", help="exporter config file (YAML)")
    p.add_argument("--config.check", dest="config_check", action="store_true",
                   help="validate the config (and lab) file and exit: 0 if good, 2 if not")
    p.add_argument("--netns", action="append", type=_netns, default=[], metavar="NAME",
                   help="also watch this named network namespace (repeatable)")
    p.add_argument("--lab", dest="lab_file", metavar="FILE",
                   help="lab file: watch its host namespace; its guests give names and probe targets")
    for name in COLLECTORS:
        p.add_argument(f"--collector.{name}", dest=f"collector_{name}", action=argparse.BooleanOptionalAction,
                       default=True, help=f"enable the {name} collector (default on)")
    p.add_argument("--device.include", dest="include", type=_regex, metavar="REGEX",
                   help="only report bridge ports whose name matches")
    p.add_argument("--device.exclude", dest="exclude", type=_regex, metavar="REGEX",
                   help="do not report bridge ports whose name matches")
    p.add_argument("--log.level", dest="log_level", choices=logs.LEVELS, default="info")
    p.add_argument("--log.format", dest="log_format", choices=logs.FORMATS, default="logfmt")
    p.add_argument("--version", action="version",
                   version=f"{PROG} {__version__} (python {platform.python_version()})")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(config_file=args.config_file, netns=list(dict.fromkeys(args.netns)), lab_file=args.lab_file,
                    enabled={c: getattr(args, f"collector_{c}") for c in COLLECTORS},
                    include=args.include, exclude=args.exclude)


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _web_config(path: str):
    """TLS and basic auth from exporter/webconfig.py (Go exporters' format): (ssl_context, middlewares)."""
    from . import webconfig
    cfg = webconfig.load(path)  # raises WebConfigError, a ConfigError: one line naming the field
    return cfg.ssl_context, tuple(cfg.middlewares)


def _prober(service_settings: Settings):
    """The prober and its /probe handler, unless --no-collector.probe."""
    if not service_settings.enabled.get("probe", True):
        return None, None
    prober = GuestProber(render=GuestCollector)
    return prober, prober.handle_probe


def main(argv: list[str] | None = None) -> int:
    # A SIGHUP before the event loop installs its reload handler must not kill us (its default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc))
    logs.setup(args.log_level, args.log_format)
    settings = settings_from(args)
    try:
        loaded = load(settings)
        ssl_context, middlewares = _web_config(args.web_config) if args.web_config else (None, ())
    except ConfigError as exc:
        return _fail(str(exc))
    if args.config_check:
        print(f"{PROG}: config ok: watching {', '.join(n or '(own)' for n in loaded.watched)}; "
              f"{len(loaded.targets)} probe targets")
        return 0

    from . import limits, privileges
    from .web import create_app

    prober, probe_handler = _prober(settings)
    service = Service(settings, loaded, prober=prober)
    app = create_app(service, reload=lambda: load(settings), probe_handler=probe_handler,
                     middlewares=middlewares, sighup=True, lifecycle=args.lifecycle)
    host, port = args.listen
    logs.event(log, "starting", version=__version__, address=f"{host or ''}:{port}",
               tls=ssl_context is not None, netns=",".join(n for n in loaded.watched if n) or "-",
               collectors=",".join(sorted({c.name for c in service.collectors})) or "-")
    # Before the event loop and its threads: capabilities are per thread.
    privileges.drop(port, netns=any(loaded.watched) or any(t.netns for t in loaded.targets),
                    probe=settings.enabled.get("probe", True), identity=settings.enabled.get("identity", True))
    try:
        limits.serve(app, host, port, ssl_context)  # web.run_app plus connection cap and slow-client deadlines
    except OSError as exc:
        return _fail(f"--web.listen-address {host or ''}:{port}: {exc.strerror or exc}", 1)
    logs.event(log, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
