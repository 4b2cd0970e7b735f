"""The git commit kvmnet was built from, for kvmnet_build_info{revision}.

Read once at start, first found wins:
1. `_revision.py`, written into the copy of the source a wheel is built from (deploy/build-wheel-venv.sh, hence the
   Dockerfile; `KVMNET_REVISION` overrides what git says there). Never committed (.gitignore).
2. an editable checkout (the package folder's parent holds `.git`): `git rev-parse HEAD` there, plus "-dirty" when
   tracked files differ from it.
3. "unknown" (a wheel built some other way, no git, or git fails).
"""
from __future__ import annotations

import functools
import os
import subprocess


@functools.cache
def revision() -> str:
    try:
        from ._revision import REVISION  # type: ignore[import-not-found,unused-ignore]

        return str(REVISION) or "unknown"
    except ImportError:
        pass
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(top, ".git")):
        return "unknown"
    try:
        head = subprocess.run(["git", "-C", top, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", top, "diff", "--quiet", "HEAD", "--"], capture_output=True,
                               timeout=5).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + "-dirty" if dirty else head) or "unknown"
