#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs, failing fast between lanes:
#   1. the lint lane (scripts/lint.sh: ruff, mypy --strict on the kernel-facing code, import-linter contracts)
#   2. the unit tier (tests/unit: unprivileged, no namespaces, seconds)
#   3. the root tiers: namespaces (tests/netns) and end to end (tests/e2e: real QEMU guests under TCG, Prometheus)
# Needs root for 3.
#
# With arguments, they go to pytest as one run and the lanes are skipped (`scripts/test.sh tests/unit -k web`,
# `scripts/test.sh -m "not slow"`); set KVMNET_LINT=1 to run the lint lane first anyway.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$here/scripts/bootstrap.sh"
cd "$here"
pytest=(python -m pytest -p no:cacheprovider -ra)

if [ $# -gt 0 ]; then
  if [ "${KVMNET_LINT:-0}" = 1 ]; then bash scripts/lint.sh; fi
  kvmnet-setup image
  exec "${pytest[@]}" "$@"
fi

echo "== lint lane"
bash scripts/lint.sh
echo "== unit tier"
"${pytest[@]}" tests/unit
echo "== root tiers"
# Build the tiny guest (kernel + busybox initramfs) once, with progress, before the tests that boot it.
kvmnet-setup image
exec "${pytest[@]}" tests/netns tests/e2e
