"""Survival: the real kvmnet-exporter through what a busy KVM host and the network throw at it.

Every test here runs in CI (scripts/test.sh runs the whole suite). Those marked `slow` take 10-60 s each (tap churn
for 15 s, 2000 veths for the event burst, a slow-client deadline, real QEMU guests); deselect them for a quick run
with `-m "not slow"`. The
10-minute soak is not a test: bench/soak.py, results in bench/results/soak.md.

The witness for the topology is iproute2 (tests/witness.py); the exporter's log must never hold a traceback.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import witness
from tests.conftest import delete_netns, free_port
from tests.harness import EXPORTER, bridge_in, ip, values
from tests.netns.setup_labs import RUN_DIR, Labs, netns_list

pytestmark = pytest.mark.netns


def ports(samples, ns: str) -> set[str]:
    return {s.labels["device"] for s in samples if s.name == "kvmnet_port_up" and s.labels["netns"] == ns}


def witness_ports(ns: str, bridge: str = "br0") -> set[str]:
    return {n for n, l in witness.links(ns).items() if l.get("master") == bridge}


# --- Tap churn -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tap_churn_while_scraping(netns, exporters):
    """~40 taps a second created, enslaved and deleted for 15 s, scraped ~10 times a second: every scrape 200 and
    parseable, and afterwards the exporter agrees with iproute2."""
    bridge_in(netns)
    e = exporters("--netns", netns, "--no-collector.probe")
    churn = subprocess.Popen(["ip", "-n", netns, "-force", "-batch", "-"], stdin=subprocess.PIPE, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    made = [0]
    stop = threading.Event()

    def churner():
        n, start = 0, time.monotonic()
        while not stop.is_set():
            churn.stdin.write(f"tuntap add dev ch{n} mode tap\nlink set ch{n} master br0 up\n")
            if n >= 20:
                churn.stdin.write(f"link del ch{n - 20}\n")
            churn.stdin.flush()
            n += 1
            made[0] = n
            time.sleep(max(0.0, start + n / 40 - time.monotonic()))  # 40 a second

    t = threading.Thread(target=churner)
    t.start()
    statuses, failures, seen = [], 0, set()
    try:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            t0 = time.monotonic()
            status, body, _ = e.get("/metrics")
            statuses.append(status)
            fams = list(text_string_to_metric_families(body.decode()))  # raises if not parseable
            for fam in fams:
                for s in fam.samples:
                    if s.name == "kvmnet_scrape_collector_success" and s.value != 1:
                        failures += 1
                    if s.name == "kvmnet_port_up" and s.labels["netns"] == netns:
                        seen.add(s.labels["device"])
            time.sleep(max(0.0, t0 + 0.1 - time.monotonic()))
    finally:
        stop.set()
        t.join()
        churn.stdin.close()
        churn.wait(timeout=60)
    assert made[0] >= 500, made  # ~600 taps made in 15 s
    assert len(statuses) >= 100 and set(statuses) == {200}, (len(statuses), set(statuses))
    assert failures == 0, f"{failures} collector failures during churn: " + e.log()
    assert len(seen) > 100  # scrapes saw the churn, not a frozen picture
    time.sleep(0.2)
    assert ports(e.samples(), netns) == witness_ports(netns)


# --- Netlink overflow ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_netlink_overflow_resyncs(netns, exporters):
    """A burst of link events between two scrapes overflows the event socket (ENOBUFS); the exporter notices,
    resyncs with full dumps, and reports exactly what iproute2 sees."""
    bridge_in(netns)
    e = exporters("--netns", netns, "--no-collector.probe")
    before = values(e.samples(), "kvmnet_netlink_resyncs_total", netns=netns)
    assert before, "no resync counter for the namespace"
    batch = []
    for i in range(1000):  # ~10000 events: create both ends, enslave, up, flap twice
        batch += [f"link add v{i} type veth peer name w{i}", f"link set v{i} master br0 up",
                  f"link set w{i} up", f"link set v{i} down", f"link set v{i} up", f"link set w{i} down",
                  f"link set w{i} up"]
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(batch) + "\n", text=True, check=True)
    samples = e.samples()
    assert ports(samples, netns) == witness_ports(netns) and len(ports(samples, netns)) == 1000
    after = values(samples, "kvmnet_netlink_resyncs_total", netns=netns)
    assert after[0] > before[0], "no resync after the burst: " + e.log()[-2000:]
    assert "netlink_events_overflow" in e.log()
    assert set(values(samples, "kvmnet_scrape_collector_success", netns=netns)) == {1.0}
    # And events are followed again after the resync: a deletion shows on the next scrape.
    ip("-n", netns, "link", "del", "v7")
    assert ports(e.samples(), netns) == witness_ports(netns)


# --- A watched namespace deleted and created again -------------------------------------------------------------

def test_watched_namespace_deleted_and_recreated(netns_factory, exporters):
    ns, other = netns_factory(), netns_factory()
    bridge_in(ns)
    bridge_in(other)
    ip("-n", other, "link", "add", "o0", "type", "veth", "peer", "name", "o1")
    ip("-n", other, "link", "set", "o0", "master", "br0")
    e = exporters("--netns", ns, "--netns", other, "--no-collector.probe")
    s = e.samples()
    assert set(values(s, "kvmnet_scrape_collector_success", netns=ns)) == {1.0}
    delete_netns(ns)
    s = e.samples()
    assert set(values(s, "kvmnet_scrape_collector_success", netns=ns)) == {0.0}
    assert set(values(s, "kvmnet_scrape_collector_success", netns=other)) == {1.0}
    assert ports(s, other) == {"o0"}
    subprocess.run(["ip", "netns", "add", ns], check=True)
    bridge_in(ns, "br1")
    ip("-n", ns, "link", "add", "n0", "type", "veth", "peer", "name", "n1")
    ip("-n", ns, "link", "set", "n0", "master", "br1")
    s = e.samples()
    assert set(values(s, "kvmnet_scrape_collector_success", netns=ns)) == {1.0}
    assert ports(s, ns) == witness_ports(ns, "br1") == {"n0"}
    assert e.proc.poll() is None
    log = e.log()
    assert "collector_failed" in log  # said in the log, then recovered with no restart


# --- Abusive HTTP ----------------------------------------------------------------------------------------------

def raw(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send bytes, return whatever comes back until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:  # the server may close while we still write
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def test_abusive_http(exporters):
    e = exporters("--no-collector.probe")
    port = e.port
    # Garbage bytes: a TLS hello at a plain-HTTP port, binary noise, a bad request line.
    for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(500), os.urandom(4096),
                 b"GET /metrics HTTP/9.9\r\n\r\n", b"\r\n\r\n\r\n", b"GET " + b"/a" * 10000 + b" HTTP/1.1\r\n\r\n"):
        reply = raw(port, junk)
        assert reply == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", reply), reply[:100]
    # A 100 KB header, and 2000 small ones.
    reply = raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", reply), reply[:100]
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"))
    # A 1 MB body where none belongs.
    reply = raw(port, b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1_000_000)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    # 300 idle connections (more than the 256 allowed): scrapes still get through, idle ones are evicted.
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
    try:
        time.sleep(0.3)
        for _ in range(5):
            assert e.get("/metrics")[0] == 200
        # Concurrent scrapes, with the idle sockets still open.
        def scrape(_):
            status, body, _ = e.get("/metrics", timeout=30)
            list(text_string_to_metric_families(body.decode()))
            return status
        with ThreadPoolExecutor(50) as pool:
            assert set(pool.map(scrape, range(200))) == {200}
    finally:
        for s in idle:
            s.close()
    assert e.get("/metrics")[0] == 200
    log = e.stop()
    assert "level=error" not in log, log


@pytest.mark.slow
def test_silent_and_slow_clients_are_cut_off(exporters):
    """A connection that never sends a request, or dribbles its header, is closed after the 10 s header deadline."""
    e = exporters("--no-collector.probe")
    silent = socket.create_connection(("127.0.0.1", e.port))
    slow = socket.create_connection(("127.0.0.1", e.port))
    slow.sendall(b"GET /metrics HTTP/1.1\r\n")
    start = time.monotonic()
    closed = {}
    while len(closed) < 2 and time.monotonic() - start < 20:
        for name, s in (("silent", silent), ("slow", slow)):
            if name in closed:
                continue
            try:
                if name == "slow":
                    s.sendall(b"X")  # one byte a second, never finishing the header
                s.settimeout(1)
                if s.recv(1024) == b"":
                    closed[name] = time.monotonic() - start
            except TimeoutError:
                pass
            except OSError:
                closed[name] = time.monotonic() - start
    assert set(closed) == {"silent", "slow"}, closed
    assert all(9 <= t <= 14 for t in closed.values()), closed
    assert e.get("/metrics")[0] == 200
    silent.close()
    slow.close()


# --- Bad input -------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("wrong type", "probe:\n  interval: 5\n", "probe.interval: not a duration"),
    ("missing address", "probe:\n  targets:\n    - {name: g0}\n", "probe.targets[0].address: required"),
    ("bad address", "probe:\n  targets:\n    - {name: g0, address: 10.0.0.300}\n",
     "probe.targets[0].address: not an IP address"),
    ("unknown key", "netns: [a]\nprobes: {}\n", "probes: unknown key"),
    ("netns not a list", "netns: lab-host\n", "netns"),
    ("bad yaml", "netns: [a\n", "invalid YAML"),
]


@pytest.mark.parametrize("case,text,expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_exporter_config_one_line_exit_2_nothing_created(tmp_path, case, text, expected):
    cfg = tmp_path / "kvmnet.yml"
    cfg.write_text(text)
    port = free_port()
    before = netns_list()
    for extra in ([], ["--config.check"]):
        p = subprocess.run([EXPORTER, "--config.file", str(cfg), "--web.listen-address", f"127.0.0.1:{port}", *extra],
                           capture_output=True, text=True, timeout=30)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and expected in lines[0], p.stderr
        assert "Traceback" not in p.stderr and p.stdout == ""
    with socket.socket() as s:  # nothing listened there
        s.bind(("127.0.0.1", port))
    assert netns_list() - before == set() or all(not n.startswith("kt") for n in netns_list() - before)


@pytest.fixture
def labs(tmp_path):
    l = Labs(tmp_path)
    yield l
    l.cleanup()


BAD_LABS = [
    ("bad mac", ("guests", 0, "mac", "0a:zz:00:00:00:01"), "guests[0].mac"),
    ("unknown key", ("guests", 0, "colour", "red"), "guests[0].colour"),
    ("wrong type", ("bridges", 0, "stp", "yes"), "bridges[0].stp"),
]


@pytest.mark.parametrize("case,edit,expected", BAD_LABS, ids=[c[0] for c in BAD_LABS])
def test_bad_lab_file_one_line_exit_2_nothing_created(labs, case, edit, expected):
    """The same bad lab file given to the exporter (--lab) and to kvmnet-setup up: one line naming the field, exit 2,
    no namespace, no state directory, no listener."""
    f, d = labs.make({
        "name": "x", "namespaces": {"host": "h", "lan": "l"},
        "bridges": [{"name": "br0", "address": "192.168.98.100/24", "ports": ["eth1"]}],
        "uplink": {"name": "eth1", "address": "192.168.98.100/24", "lan": {"addresses": ["192.168.98.3/24"]}},
        "guests": [{"name": "g1", "kind": "netns", "tap": "g1h", "bridge": "br0", "address": "192.168.98.21/24"}]})
    d[edit[0]][edit[1]][edit[2]] = edit[3]
    labs.write(d, f)
    port = free_port()
    runs = [[EXPORTER, "--lab", str(f), "--web.listen-address", f"127.0.0.1:{port}"],
            [EXPORTER, "--lab", str(f), "--config.check"],
            [os.path.join(os.path.dirname(sys.executable), "kvmnet-setup"), "up", "-c", str(f)]]
    for argv in runs:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and expected in lines[0], (argv, p.stderr)
        assert "Traceback" not in p.stderr
    assert not [n for n in netns_list() if n.startswith(d["name"])]
    assert not (RUN_DIR / d["name"]).exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# --- A guest's QEMU crashing -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.timeout(400)
def test_qemu_crash_is_reported_and_nothing_else_is_affected(labs, exporters):
    """Two real QEMU guests (the seed lab, renamed). kill -9 one QEMU: its tap loses carrier (port_up 0) and the
    guest goes down in the prober; the other guest, the bridge and the exporter carry on."""
    f, d = labs.seed()
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "kvmnet-setup"), "up", "-c", str(f)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    host = d["namespaces"]["host"]
    e = exporters("--lab", str(f))

    def wait(pred, what, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            s = e.samples()
            if pred(s):
                return s
            assert time.monotonic() < deadline, f"{what}: " + e.log()[-3000:]
            time.sleep(0.5)

    wait(lambda s: values(s, "kvmnet_guest_up", guest="vm1") == [1.0] and
         values(s, "kvmnet_guest_up", guest="vm2") == [1.0], "guests never came up", timeout=120)
    pid = int((RUN_DIR / d["name"] / "vm1.pid").read_text().split()[0]) if (RUN_DIR / d["name"] / "vm1.pid").exists() \
        else int(next((RUN_DIR / d["name"]).rglob("vm1.pid")).read_text().split()[0])
    os.kill(pid, 9)
    s = wait(lambda s: values(s, "kvmnet_guest_up", guest="vm1") == [0.0] and
             values(s, "kvmnet_port_up", netns=host, device="vm1eth0") == [0.0], "crash not reported")
    assert values(s, "kvmnet_guest_up", guest="vm2") == [1.0]
    assert values(s, "kvmnet_port_up", netns=host, device="vm2eth0") == [1.0]
    assert values(s, "kvmnet_bridge_up", netns=host, bridge="br0") == [1.0]
    assert set(values(s, "kvmnet_scrape_collector_success")) == {1.0}
    links = witness.links(host)
    assert "LOWER_UP" not in links["vm1eth0"]["flags"] and "LOWER_UP" in links["vm2eth0"]["flags"]
