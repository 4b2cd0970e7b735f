#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs unit, namespace and end-to-end
# tests (real QEMU guests under TCG, a real Prometheus). Needs root. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$here/scripts/bootstrap.sh"
cd "$here"
# Build the tiny guest (kernel + busybox initramfs) once, with progress, before the tests that boot it.
kvmnet-setup image
exec python -m pytest -p no:cacheprovider -ra "$@"
