#!/usr/bin/env bash
# The fast first lane: ruff (style, bugs), mypy (strict on the kernel-facing and prober code), import-linter (the
# module contracts in pyproject.toml). Unprivileged, a few seconds. Run by scripts/test.sh before the tests; run it
# on its own with `scripts/lint.sh` (after `source scripts/bootstrap.sh`).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
py=${PYTHON:-$here/.venv/bin/python}
bin=$(dirname "$py")

# Static tools cannot follow the editable install's import hook (kvmnet.exporter -> exporter/), so they look
# through .lint/kvmnet: symlinks to the three folders, so a new module is seen without reinstalling.
mkdir -p .lint/kvmnet
for d in common exporter setup; do ln -sfn "../../$d" ".lint/kvmnet/$d"; done

echo "lint: ruff"
"$bin/ruff" check --quiet .
echo "lint: mypy"
# Strict (pyproject [tool.mypy]) on what talks to the kernel and the prober; the rest follows as imported.
MYPYPATH=.lint "$bin/mypy" --no-error-summary -p kvmnet.common -p kvmnet.exporter.sources -p kvmnet.exporter.prober
echo "lint: import contracts"
PYTHONPATH="$here/.lint:$here" "$bin/lint-imports" --no-cache
