"""kvmnet exporter: Prometheus metrics for Linux bridges, taps and the guests behind them."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvmnet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

DEFAULT_PORT = 9848
