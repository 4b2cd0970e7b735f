"""The stand-in for `docker build` + `docker run`: the Dockerfile's own steps, read from the Dockerfile, run here.

Its `RUN build-wheel-venv.sh ...` lines build the wheel and install it into a clean venv (and give the interpreter
file capabilities); then its ENTRYPOINT starts as a non-root user with only the capabilities the README tells
operators to grant (setpriv: what `USER kvmnet` + `--cap-drop ALL --cap-add ...` amount to), we scrape it, ping
loopback through its prober (CAP_NET_RAW as non-root), and run its HEALTHCHECK command.
"""
import json
import os
import subprocess
import tempfile
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.e2e.wheelvenv import build, dockerfile, in_venv, instruction, script_steps

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root for setcap and setpriv"),
              pytest.mark.timeout(300)]




@pytest.fixture(scope="module")
def venv():
    assert [s[:2] for s in script_steps()] == [["build-wheel-venv.sh", "build"], ["build-wheel-venv.sh", "caps"]]
    return build()


def as_container_user(argv: list[str]) -> list[str]:
    """USER kvmnet (here: nobody) with the capabilities the README grants and nothing else."""
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all,+net_raw,+sys_admin,+sys_ptrace,+dac_read_search", *argv]


def image_cmd(venv: str, name: str) -> list[str]:
    """ENTRYPOINT or HEALTHCHECK's CMD from the Dockerfile, with the image's venv path replaced by ours."""
    value = instruction(dockerfile(), name)[0]
    if name == "HEALTHCHECK":
        value = value.split(" CMD ", 1)[1]
    return in_venv(venv, json.loads(value))


def test_dockerfile_shape():
    text = dockerfile()
    assert len(instruction(text, "FROM")) == 2, "multi-stage"
    assert instruction(text, "USER") == ["kvmnet"]
    assert instruction(text, "EXPOSE") == ["9848"]
    assert instruction(text, "HEALTHCHECK") and instruction(text, "ENTRYPOINT")


def test_wheel_in_clean_venv_serves_as_non_root(venv, tmp_path):
    # A clean venv: the wheel and its dependencies only, no editable install of this tree.
    out = subprocess.run([os.path.join(venv, "bin", "python3"), "-c",
                          "import kvmnet.exporter, sys; print(kvmnet.exporter.__file__); print(sys.prefix)"],
                         check=True, capture_output=True, text=True).stdout.split()
    assert out[0].startswith(venv) and "site-packages" in out[0] and out[1] == venv
    caps = subprocess.run(["getcap", os.path.join(venv, "bin", "python3")], capture_output=True, text=True).stdout
    assert "cap_net_raw" in caps and "=p" in caps

    config = tempfile.NamedTemporaryFile("w", suffix=".yml", dir="/tmp", delete=False)
    config.write("probe:\n  interval: 200ms\n  timeout: 500ms\n  targets:\n    - {name: lo, address: 127.0.0.1}\n")
    config.close()
    os.chmod(config.name, 0o644)
    port = free_port()
    argv = as_container_user([*image_cmd(venv, "ENTRYPOINT"), "--web.listen-address", f"127.0.0.1:{port}",
                              "--config.file", config.name])
    log = open(tmp_path / "exporter.log", "w+")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd="/")
    health = image_cmd(venv, "HEALTHCHECK")
    env = {**os.environ, "KVMNET_HEALTHCHECK_URL": f"http://127.0.0.1:{port}/healthz"}
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(as_container_user(health), env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None, open(log.name).read()
            assert time.monotonic() < deadline, "HEALTHCHECK never passed: " + open(log.name).read()
            time.sleep(0.2)
        status = pid_status(proc.pid)
        assert status["Uid"].split()[0] == "65534"
        deadline = time.monotonic() + 10
        while True:  # the prober's raw socket works as non-root: loopback answers
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert r.status == 200
                fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
            up = [s.value for s in fams.get("kvmnet_guest_up", type("", (), {"samples": []})).samples]
            if up == [1.0]:
                break
            assert time.monotonic() < deadline, f"guest_up {up}: " + open(log.name).read()
            time.sleep(0.3)
        assert "kvmnet_build_info" in fams and "kvmnet_scrape_collector_success" in fams
        # the commit was baked into the wheel (deploy/build-wheel-venv.sh), not read from a checkout
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
        assert fams["kvmnet_build_info"].samples[0].labels["revision"] == head
        assert "privileges_missing" not in open(log.name).read()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.unlink(config.name)
    assert subprocess.run(health, env=env, capture_output=True).returncode == 1  # and it notices a dead exporter
    text = open(log.name).read()
    assert "Traceback" not in text, text


def pid_status(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out
