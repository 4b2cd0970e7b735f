"""The issue's "done when", as a new user: the seed lab's two QEMU guests are up with sane RTTs under
`kvmnet-exporter --lab`, and killing one guest's QEMU turns it to 0 within 5 s while the other stays 1.
Witnesses: fping for the RTT, the QEMU pidfile for what we kill. Namespaces are renamed (never seed-host)."""
import os
import signal
import statistics
import subprocess
import time

import pytest

from tests.harness import Exporter, value
from tests.netns.setup_labs import RUN_DIR, Labs, cli

pytestmark = pytest.mark.qemu


@pytest.fixture
def labs(tmp_path):
    l = Labs(tmp_path)
    yield l
    l.cleanup()


def test_seed_guests_up_then_killed_qemu_down_within_5s(labs):
    path, lab = labs.seed()
    host = lab["namespaces"]["host"]
    cli("up", "-c", str(path), check=True, timeout=600)
    e = Exporter("--lab", str(path), "--no-collector.bridge", "--no-collector.fdb", log_dir=labs.tmp)
    try:
        deadline = time.monotonic() + 120  # TCG boot
        while not all(value(text := e.metrics(), "kvmnet_guest_up", netns=host, guest=g) == 1 for g in ("vm1", "vm2")):
            assert time.monotonic() < deadline, "seed guests never up"
            time.sleep(1)
        time.sleep(3)
        text = e.metrics()
        fp = subprocess.run(["ip", "netns", "exec", host, "fping", "-q", "-C", "10", "-p", "100", "192.168.98.11"],
                            capture_output=True, text=True).stderr
        ref = statistics.median(float(v) for v in fp.split(":", 1)[1].split() if v != "-") / 1000
        for g in ("vm1", "vm2"):
            n = value(text, "kvmnet_guest_ping_rtt_seconds_count", netns=host, guest=g)
            mean = value(text, "kvmnet_guest_ping_rtt_seconds_sum", netns=host, guest=g) / n
            # TCG guests answer in ~0.1-1 ms; kvmnet's mean within the benchmark's goal of fping, with slack
            # for TCG's jitter (a mean over the whole run vs fping's median now).
            print(f"{g}: kvmnet mean RTT {mean * 1e6:.0f} us, fping p50 {ref * 1e6:.0f} us")
            assert 0 < mean < 5 * ref + 1e-3, (g, mean, ref)

        pid = int((RUN_DIR / lab["name"] / "guests" / "vm1.pid").read_text().split()[0])
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # QEMU dies, its tap goes with it
        while value(e.metrics(), "kvmnet_guest_up", netns=host, guest="vm1") != 0:
            assert time.monotonic() - killed < 10, "vm1 never reported down"
            time.sleep(0.1)
        took = time.monotonic() - killed
        print(f"vm1 down after {took:.2f} s")
        assert took <= 5.0, took
        assert value(e.metrics(), "kvmnet_guest_up", netns=host, guest="vm2") == 1
    finally:
        err = e.stop()
        assert "Traceback" not in err, err
