"""The Dockerfile's build steps (deploy/build-wheel-venv.sh, as its RUN lines call it), run once per test process.

The venv lives under a world-readable /tmp directory and uses a system interpreter, so a non-root user can run it
the way the image's `USER kvmnet` does. Removed at exit.
"""
from __future__ import annotations

import atexit
import functools
import os
import re
import shlex
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "deploy", "build-wheel-venv.sh")
IMAGE_VENV = "/opt/kvmnet"


def dockerfile() -> str:
    return re.sub(r"\\\n\s*", " ", open(os.path.join(ROOT, "Dockerfile")).read())  # join continuation lines


def instruction(text: str, name: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


def script_steps() -> list[list[str]]:
    return [shlex.split(r) for r in instruction(dockerfile(), "RUN") if "build-wheel-venv.sh" in r]


@functools.cache
def build() -> str:
    """Run the Dockerfile's script steps with /src -> this tree and /opt/kvmnet -> a temp venv; return its path."""
    base = tempfile.mkdtemp(prefix="kvmnet-wheel-", dir="/tmp")
    atexit.register(shutil.rmtree, base, True)
    os.chmod(base, 0o755)
    path = os.path.join(base, "kvmnet")
    env = dict(os.environ)
    if os.path.exists("/usr/bin/python3"):  # not an interpreter under /root, which a non-root user cannot reach
        env["PYTHON"] = "/usr/bin/python3"
    for step in script_steps():
        args = [ROOT if a == "/src" else path if a == IMAGE_VENV else a for a in step[1:]]
        p = subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise AssertionError(f"build-wheel-venv.sh {' '.join(args)}: {p.returncode}\n{p.stdout}\n{p.stderr}")
    return path


def in_venv(venv: str, argv: list[str]) -> list[str]:
    return [venv + a[len(IMAGE_VENV):] if a.startswith(IMAGE_VENV) else a for a in argv]
