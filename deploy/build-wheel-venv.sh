#!/bin/sh
# The container's build steps, as one script that the Dockerfile runs and tests/e2e/test_wheel_venv.py runs too
# (no Docker engine runs where the tests run, so this is how the Dockerfile stays tested).
#
#   build-wheel-venv.sh build SRC VENV    build kvmnet's wheel from SRC (a copy, so SRC stays clean; the git commit
#                                         baked in as exporter/_revision.py) and install it with its dependencies
#                                         into a new, empty venv at VENV
#   build-wheel-venv.sh caps VENV         give VENV's interpreter file capabilities, permitted only (+p), so a
#                                         non-root user can use NET_RAW, SYS_ADMIN, SYS_PTRACE, DAC_READ_SEARCH when
#                                         the container is granted them; the exporter raises them itself at start
#                                         (exporter/privileges.py). Without +e, exec still works when they are not
#                                         granted: the exporter then says what is missing.
#
# PYTHON picks the interpreter (default python3). Needs network access to PyPI for the dependencies.
set -eu
PYTHON=${PYTHON:-python3}

case "${1:-}" in
build)
  src=$(cd "$2" && pwd); venv=$3
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/src"
  # Only what the wheel is made of: no .venv, no build/ left in the source tree others work in.
  (cd "$src" && tar cf - pyproject.toml README.md LICENSE exporter setup common) | (cd "$work/src" && tar xf -)
  # kvmnet_build_info{revision}: bake the commit into the copy (exporter/revision.py). KVMNET_REVISION wins (the
  # Dockerfile's build context has no .git), then git in SRC, else "unknown".
  rev=${KVMNET_REVISION:-$(git -C "$src" rev-parse HEAD 2>/dev/null || echo unknown)}
  printf 'REVISION = "%s"\n' "$rev" > "$work/src/exporter/_revision.py"
  "$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$work/wheels" "$work/src"
  "$PYTHON" -m venv --clear "$venv"
  "$venv/bin/pip" install -q --no-cache-dir "$work"/wheels/kvmnet-*.whl
  "$venv/bin/kvmnet-exporter" --version
  ;;
caps)
  venv=$2
  # The venv's python is a symlink to the base interpreter; file capabilities go on a private copy instead, so
  # no other program on the host or image gains them.
  real=$(readlink -f "$venv/bin/python3")
  if [ "$real" != "$(cd "$venv/bin" && pwd)/python3" ]; then
    cp "$real" "$venv/bin/python3.caps"
    mv "$venv/bin/python3.caps" "$venv/bin/python3"
  fi
  setcap cap_net_raw,cap_sys_admin,cap_sys_ptrace,cap_dac_read_search+p "$venv/bin/python3"
  getcap "$venv/bin/python3"
  ;;
*)
  echo "usage: $0 build SRC VENV | caps VENV" >&2
  exit 2
  ;;
esac
