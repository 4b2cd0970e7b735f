"""What tests share to drive the real processes: the `kvmnet-exporter` binary, the stand-in QEMU, light-guest labs.

    e = exporters("--netns", ns, "--no-collector.probe")   # conftest fixture: started, ready, stopped afterwards
    status, body, headers = e.get("/metrics")
    value(e.metrics(), "kvmnet_bridge_ports", netns=ns, bridge="br0")
    e.stop()   # SIGTERM to its PID, the log text back (stdout and stderr, from a file: a pipe could fill and stall it)

Fixtures are in tests/conftest.py (`exporters`, `light_lab`); test modules import helpers from here, never from
each other.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

EXPORTER = os.path.join(os.path.dirname(sys.executable), "kvmnet-exporter")
FAKE_QEMU = os.path.join(os.path.dirname(__file__), "netns", "fake_qemu.py")


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


def bridge_in(ns: str, name: str = "br0") -> None:
    """A bridge `name`, up, in namespace `ns`."""
    ip("-n", ns, "link", "add", name, "type", "bridge")
    ip("-n", ns, "link", "set", name, "up")


# --- reading an exposition ------------------------------------------------------------------------------------

def samples(text: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(text: str, name: str, **lbl: str) -> float | None:
    """The first sample `name` whose labels include `lbl`, or None."""
    for s in samples(text):
        if s.name == name and all(s.labels.get(k) == v for k, v in lbl.items()):
            return s.value
    return None


def values(parsed: list, name: str, **lbl: str) -> list[float]:
    """Every sample `name` whose labels include `lbl`, from already parsed samples."""
    return [s.value for s in parsed if s.name == name and all(s.labels.get(k) == v for k, v in lbl.items())]


# --- the exporter process -------------------------------------------------------------------------------------

class Exporter:
    """The real binary on 127.0.0.1:<free port>, ready once `/healthz` answers 200 (or, with `ready="tcp"`, once
    the port accepts: TLS and basic auth guard /healthz). Its output goes to a log file in `log_dir`."""

    def __init__(self, *args: str, log_dir: str | os.PathLike[str] | None = None, log_format: str | None = None,
                 ready: str = "http", scheme: str = "http", timeout: float = 30) -> None:
        from tests.conftest import free_port

        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="kq-exporter-")) / f"exporter-{self.port}.log"
        self._log = open(self.log_path, "w")
        argv = [EXPORTER, "--web.listen-address", f"127.0.0.1:{self.port}"]
        if log_format is not None:
            argv += ["--log.format", log_format]
        self.proc = subprocess.Popen([*argv, *args], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while not self._ready(ready):
                assert self.proc.poll() is None, f"exporter exited {self.proc.returncode}: {self.log()}"
                assert time.monotonic() < deadline, "exporter did not come up: " + self.log()
                time.sleep(0.1)
        except BaseException:
            self.stop()  # never leave it running: the fixture only stops the exporters it got back
            raise

    def _ready(self, how: str) -> bool:
        if how == "tcp":
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET",
            timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def metrics(self) -> str:
        status, body, _ = self.get("/metrics")
        assert status == 200
        return body.decode()

    def samples(self) -> list:
        return samples(self.metrics())

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> str:
        """SIGTERM to the exporter's PID (SIGKILL after 15 s); its log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.log()


# --- stand-ins for guests -------------------------------------------------------------------------------------

def start_fake_qemu(netns: str, taps: list[str], qemu_args: list[str], tmp_path: Path,
                    tap_netns: str | None = None) -> subprocess.Popen:
    """The stand-in QEMU inside `netns`, argv[0] = .../qemu-system-x86_64; returns once its taps exist.

    The name is a symlink to the real interpreter (Python finds its library through it; `exec -a` would not)."""
    exe = tmp_path / "qemu-system-x86_64"
    if not exe.exists():
        exe.symlink_to(os.path.realpath(sys.executable))
    cmd = ["ip", "netns", "exec", netns, str(exe), FAKE_QEMU, ",".join(taps), *qemu_args]
    env = dict(os.environ, FAKE_QEMU_TAP_NETNS=tap_netns) if tap_netns else None
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


class LightLab:
    """A host namespace with bridge br0 (10.200.0.1/16, fd20::1/64) and guests g1..gN at 10.200.1.i / fd20::1:i."""

    def __init__(self, netns_factory: Any, n: int) -> None:
        self.factory = netns_factory
        self.host = netns_factory("kph")
        ip("-n", self.host, "link", "add", "br0", "type", "bridge")
        ip("-n", self.host, "addr", "add", "10.200.0.1/16", "dev", "br0")
        ip("-n", self.host, "addr", "add", "fd20::1/64", "dev", "br0", "nodad")
        ip("-n", self.host, "link", "set", "br0", "up")
        self.guests: dict[str, str] = {}  # guest name -> its namespace
        for i in range(1, n + 1):
            self.add_guest(i)

    def add_guest(self, i: int) -> str:
        ns = self.factory("kpg")
        port = f"vg{i}"
        ip("-n", self.host, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.host, "link", "set", port, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"10.200.1.{i}/16", "dev", "eth0")
        ip("-n", ns, "addr", "add", f"fd20::1:{i}/64", "dev", "eth0", "nodad")
        ip("-n", ns, "link", "set", "eth0", "up")
        self.guests[f"g{i}"] = ns
        return ns

    def target(self, i: int, v6: bool = False, name: str | None = None) -> Any:
        from kvmnet.exporter.prober.targets import Target

        addr = f"fd20::1:{i}" if v6 else f"10.200.1.{i}"
        return Target(name or f"g{i}" + ("v6" if v6 else ""), ipaddress.ip_address(addr), self.host)

    def fping_p50(self, i: int, count: int = 20, period_ms: int = 20) -> float:
        """fping's median RTT to guest i, in seconds (the reference)."""
        out = subprocess.run(["ip", "netns", "exec", self.host, "fping", "-C", str(count), "-p", str(period_ms),
                              "-q", f"10.200.1.{i}"], capture_output=True, text=True).stderr
        vals = [float(v) for v in out.split(":", 1)[1].split() if v != "-"]
        return statistics.median(vals) / 1000
