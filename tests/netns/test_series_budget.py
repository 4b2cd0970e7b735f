"""The series budget in README "Scale-out", counted from the real exporter's output: 32 series per bridge port,
20 per bridge, 29 per probed guest. If a collector adds a series, this fails and the README's arithmetic needs
redoing."""
import pytest

from tests.harness import bridge_in

pytestmark = pytest.mark.netns
PER_PORT, PER_BRIDGE, PER_GUEST = 32, 20, 29


def test_series_per_port_bridge_guest(netns, exporters, tmp_path):
    bridge_in(netns)
    batch = []
    for i in range(10):
        batch += [f"link add v{i} type veth peer name w{i}", f"link set v{i} master br0 up", f"link set w{i} up"]
    batch += [f"addr add 10.66.0.{i + 1}/24 dev w{i}" for i in range(5)]
    import subprocess
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(batch) + "\n", text=True, check=True)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"netns: [{netns}]\nprobe:\n  targets:\n" +
                   "".join(f"    - {{name: g{i}, address: 10.66.0.{i + 1}}}\n" for i in range(5)))
    e = exporters("--config.file", str(cfg), "--no-collector.identity")
    s = e.samples()
    mine = [x for x in s if x.labels.get("netns") == netns]
    port = [x for x in mine if x.name.startswith("kvmnet_port_")]
    bridge = [x for x in mine if x.name.startswith("kvmnet_bridge_")]
    guest = [x for x in mine if x.name.startswith("kvmnet_guest_")]
    assert len(port) == PER_PORT * 10, sorted({x.name for x in port})
    assert len(bridge) == PER_BRIDGE, sorted(x.name for x in bridge)
    assert len(guest) == PER_GUEST * 5, sorted({x.name for x in guest})
