"""kvmnet-setup on real namespaces, run as a subprocess; iproute2 (tests/witness.py) says what the kernel holds."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests import witness
from tests.netns.setup_labs import RUN_DIR, Labs, addrs, cli, netns_list, ping, start_cli, wait_stopped

pytestmark = pytest.mark.netns


@pytest.fixture
def labs(tmp_path):
    l = Labs(tmp_path)
    yield l
    l.cleanup()


def light_lab() -> dict:
    """The seed's topology with light guests in place of QEMU, plus spare taps with the tap options."""
    return {
        "name": "x",
        "namespaces": {"host": "h", "lan": "l"},
        "bridges": [{"name": "br0", "address": "192.168.98.100/24", "ports": ["eth1"],
                     "stp": {"enabled": False, "forward_delay": 4, "hello_time": 1, "max_age": 10}}],
        "uplink": {"name": "eth1", "address": "192.168.98.100/24", "lan": {"addresses": ["192.168.98.3/24"]}},
        "taps": [{"name": "t0", "bridge": "br0", "multi_queue": True, "vnet_hdr": False},
                 {"name": "t1", "bridge": "br0", "owner": "nobody"}],
        "guests": [
            {"name": "g1", "kind": "netns", "tap": "g1h", "bridge": "br0", "address": "192.168.98.21/24",
             "mac": "0a:00:00:00:00:21"},
            {"name": "g2", "kind": "netns", "tap": "g2h", "bridge": "br0", "address": "192.168.98.22/24"},
        ],
    }


def test_up_builds_what_iproute2_shows(labs):
    f, d = labs.make(light_lab())
    host, lan = d["namespaces"]["host"], d["namespaces"]["lan"]
    p = cli("up", "-c", str(f), check=True)
    assert "lab " in p.stdout and "change(s)" in p.stdout

    links = witness.links(host)
    br = links["br0"]
    assert br["linkinfo"]["info_kind"] == "bridge" and "UP" in br["flags"]
    info = br["linkinfo"]["info_data"]
    assert (info["stp_state"], info["forward_delay"], info["hello_time"], info["max_age"]) == (0, 400, 100, 1000)
    assert addrs(host, "br0") == ["192.168.98.100/24"]
    assert addrs(host, "eth1") == []           # the seed's address move: flushed off eth1, now on br0
    ports = witness.bridge_ports(host)
    assert {n for n, p in ports.items() if p.get("master") == "br0"} == {"eth1", "t0", "t1", "g1h", "g2h"}
    t0, t1 = links["t0"]["linkinfo"]["info_data"], links["t1"]["linkinfo"]["info_data"]
    assert t0["type"] == "tap" and t0["multi_queue"] and not t0["vnet_hdr"] and t0["persist"]
    assert t1["user"] == "nobody" and t1["vnet_hdr"] and not t1["multi_queue"]
    assert addrs(lan, "eth0") == ["192.168.98.3/24"]

    g1 = witness.links(f"{d['name']}-g1")["eth0"]
    assert g1["address"] == "0a:00:00:00:00:21" and "UP" in g1["flags"]
    assert addrs(f"{d['name']}-g1", "eth0") == ["192.168.98.21/24"]
    # The LAN peer reaches the light guests through eth1 -> br0 -> g1h, as the seed's LAN reaches vm1.
    for ip in ("192.168.98.21", "192.168.98.22", "192.168.98.100"):
        ping(lan, ip)

    st = json.loads((RUN_DIR / d["name"] / "taps.json").read_text())
    assert st["t0"] == {"bridge": "br0", "netns": host, "lab": d["name"]}

    s = json.loads(cli("status", "-c", str(f), "--json", check=True).stdout)
    ports_seen = {p["name"]: p for b in s["bridges"] for p in b["ports"]}
    assert ports_seen["g1h"]["carrier"] is True and ports_seen["t0"]["carrier"] is False
    assert ports_seen["g1h"]["guest"] == "g1"
    assert {g["name"]: g["running"] for g in s["guests"]} == {"g1": True, "g2": True}
    assert "BRIDGE" in cli("status", "-c", str(f), check=True).stdout


def test_up_twice_changes_nothing(labs):
    f, d = labs.make(light_lab())
    cli("up", "-c", str(f), check=True)
    # ifindex proves nothing was recreated; carrier flags settle asynchronously (linkwatch), so only UP is compared.
    before = {ns: {n: (l["ifindex"], l.get("master"), "UP" in l["flags"]) for n, l in witness.links(ns).items()}
              for ns in (d["namespaces"]["host"], d["namespaces"]["lan"])}
    again = json.loads(cli("up", "-c", str(f), "--json", check=True).stdout)
    assert again["changed"] == 0 and again["actions"] == []
    assert json.loads(cli("plan", "-c", str(f), "--json", check=True).stdout) == []
    after = {ns: {n: (l["ifindex"], l.get("master"), "UP" in l["flags"]) for n, l in witness.links(ns).items()}
             for ns in before}
    assert after == before


def test_up_repairs_only_the_difference(labs):
    f, d = labs.make(light_lab())
    host = d["namespaces"]["host"]
    cli("up", "-c", str(f), check=True)
    subprocess.run(["ip", "-n", host, "link", "set", "t1", "nomaster"], check=True)
    subprocess.run(["ip", "-n", f"{d['name']}-g2", "addr", "flush", "dev", "eth0"], check=True)
    subprocess.run(["ip", "netns", "del", f"{d['name']}-g1"], check=True)  # takes g1h with it
    p = json.loads(cli("up", "-c", str(f), "--json", check=True).stdout)
    assert [(a["op"], a["name"]) for a in p["actions"]] == [
        ("master", "t1"), ("light_add", "g1"), ("light_del", "g2"), ("light_add", "g2")]
    assert witness.bridge_ports(host)["t1"]["master"] == "br0"
    for ip in ("192.168.98.21", "192.168.98.22"):
        ping(d["namespaces"]["lan"], ip)


def test_down_leaves_nothing(labs):
    f, d = labs.make(light_lab())
    cli("up", "-c", str(f), check=True)
    ours = {d["namespaces"]["host"], d["namespaces"]["lan"], f"{d['name']}-g1", f"{d['name']}-g2"}
    assert ours <= netns_list()
    p = cli("down", "-c", str(f), check=True)
    assert "removed" in p.stdout
    assert not ours & netns_list()
    assert not (RUN_DIR / d["name"]).exists()
    root = {l["ifname"] for l in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True,
                                                            text=True).stdout)}
    assert not {"t0", "t1", "g1h", "g2h"} & root    # nothing leaked into the root namespace
    assert "nothing recorded" in cli("down", "-c", str(f), check=True).stdout


def test_down_follows_the_record_not_the_edited_file(labs):
    f, d = labs.make(light_lab())
    cli("up", "-c", str(f), check=True)
    made = {d["namespaces"]["host"], d["namespaces"]["lan"], f"{d['name']}-g1", f"{d['name']}-g2"}
    # Edit the file: other namespaces, guests gone, and even something invalid. `down` still removes what was made.
    edited = dict(d, namespaces={"host": d["name"] + "-new", "lan": d["name"] + "-new2"}, guests=[],
                  taps=[{"name": "t0", "bridge": "brX"}])
    labs.write(edited, f)
    cli("down", "-c", str(f), check=True)
    assert not made & netns_list()
    assert not (RUN_DIR / d["name"]).exists()


def test_failure_part_way_rolls_back_this_run_only(labs):
    # `up` is paused just after recording its intent to make light guest g2's namespace; meanwhile someone else
    # takes that name. Creating it then fails: what this run made goes, the other's namespace stays, untouched.
    f, d = labs.make(light_lab())
    g2 = f"{d['name']}-g2"
    p = start_cli("up", "-c", str(f), hook=f"stop-at:light:{g2}")
    try:
        wait_stopped(p)
        subprocess.run(["ip", "netns", "add", g2], check=True)
        foreign = os.stat(f"/run/netns/{g2}").st_ino
    finally:
        os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "create light guest g2" in lines[0] and "rolled back" in lines[0], err
    assert "Traceback" not in err
    assert d["namespaces"]["host"] not in netns_list() and f"{d['name']}-g1" not in netns_list()
    assert g2 in netns_list() and os.stat(f"/run/netns/{g2}").st_ino == foreign
    assert not (RUN_DIR / d["name"]).exists()
    subprocess.run(["ip", "netns", "del", g2], check=True)


BAD = [
    ("yaml", None, "invalid YAML"),
    ("unknown key", ("guests", 0, "colour", "red"), "guests[0].colour: unknown key"),
    ("bad mac", ("guests", 1, "mac", "0a:zz"), "guests[1].mac: not a MAC address: '0a:zz'"),
    ("long name", ("taps", 0, "name", "tap-name-too-long"), "taps[0].name: device name must be 1 to 15 bytes"),
    ("slash", ("guests", 0, "tap", "g/1"), "guests[0].tap: device name the kernel refuses"),
    ("dup name", ("guests", 1, "name", "g1"), "guests[1].name: duplicate guest name"),
    ("dup mac", ("guests", 1, "mac", "0a:00:00:00:00:21"), "guests[1].mac: duplicate MAC address"),
    ("dup address", ("guests", 1, "address", "192.168.98.21/24"), "guests[1].address: duplicate address"),
    ("outside subnet", ("guests", 1, "address", "10.9.9.9/24"), "guests[1].address: 10.9.9.9/24 is outside"),
    ("missing image", ("guests", 2, "image", "/nonexistent/debian-8.7.1-amd64.img"), "guests[2].image: no such image"),
]


@pytest.mark.parametrize("case, edit, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_exit_2_nothing_created(labs, case, edit, expected):
    lab = light_lab()
    lab["guests"].append({"name": "vm1", "tap": "vm1eth0", "bridge": "br0", "address": "192.168.98.11/24"})
    f, d = labs.make(lab)
    if edit:
        where = d[edit[0]][edit[1]]
        where[edit[2]] = edit[3]
        labs.write(d, f)
    else:
        f.write_text(f.read_text() + "\nbridges: [ {name: br0\n")
    for cmd in ("up", "plan"):
        p = cli(cmd, "-c", str(f))
        assert p.returncode == 2, (p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in p.stderr, p.stderr
        assert p.stdout == ""
    assert not [n for n in netns_list() if n.startswith(d["name"])]   # other sessions' namespaces come and go
    assert not (RUN_DIR / d["name"]).exists()


def test_default_route_uplink_is_refused_unless_forced(labs):
    lab = light_lab()
    lab["uplink"]["gateway"] = "192.168.98.1"
    f, d = labs.make(lab)
    p = cli("up", "-c", str(f))
    assert p.returncode == 2 and "carries the default route" in p.stderr and "--force" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not [n for n in netns_list() if n.startswith(d["name"])]
    cli("up", "-c", str(f), "--force", check=True)
    host = d["namespaces"]["host"]
    routes = json.loads(subprocess.run(["ip", "-n", host, "-j", "route", "show", "default"], capture_output=True,
                                       text=True, check=True).stdout)
    assert [(r["gateway"], r["dev"]) for r in routes] == [("192.168.98.1", "br0")]
    assert addrs(host, "eth1") == [] and addrs(host, "br0") == ["192.168.98.100/24"]


def test_hooks_attach_and_detach_a_tap(labs):
    f, d = labs.make(light_lab())
    host = d["namespaces"]["host"]
    cli("up", "-c", str(f), check=True)
    hook = lambda name, tap, env=None: subprocess.run(  # noqa: E731
        ["ip", "netns", "exec", host, name, tap], capture_output=True, text=True, env=env)
    import os
    import sys
    from pathlib import Path
    ifup, ifdown = (str(Path(sys.executable).parent / n) for n in ("kvmnet-ifup", "kvmnet-ifdown"))
    assert hook(ifdown, "t1").returncode == 0
    assert "master" not in witness.bridge_ports(host).get("t1", {}) and "UP" not in witness.links(host)["t1"]["flags"]
    assert hook(ifup, "t1").returncode == 0     # bridge found in taps.json
    assert witness.bridge_ports(host)["t1"]["master"] == "br0" and "UP" in witness.links(host)["t1"]["flags"]
    subprocess.run(["ip", "-n", host, "link", "add", "br9", "type", "bridge"], check=True)
    assert hook(ifup, "t1", env=dict(os.environ, KVMNET_BRIDGE="br9")).returncode == 0
    assert witness.bridge_ports(host)["t1"]["master"] == "br9"
    p = hook(ifup, "nosuchtap")
    assert p.returncode == 1 and p.stderr.startswith("kvmnet-ifup: nosuchtap:")
    assert hook(ifdown, "nosuchtap").returncode == 0


def test_nat_one_way(labs):
    import yaml

    from tests.netns.setup_labs import EXAMPLES
    f, d = labs.make(yaml.safe_load((EXAMPLES / "nat-lab.yaml").read_text()))
    cli("up", "-c", str(f), check=True)
    host, wan, g1 = d["namespaces"]["host"], d["namespaces"]["lan"], f"{d['name']}-g1"
    assert addrs(host, "wan0") == ["203.0.113.1/24"]           # routed: the uplink keeps its address
    assert "master" not in witness.bridge_ports(host).get("wan0", {})
    ping(g1, "203.0.113.2")        # the guest reaches the WAN peer
    # Masqueraded: the WAN peer saw the host's address, not 10.0.0.11.
    conn = subprocess.run(["ip", "netns", "exec", host, "nft", "list", "table", "inet", "kvmnet"],
                          capture_output=True, text=True, check=True).stdout
    assert "masquerade" in conn
    assert json.loads(cli("up", "-c", str(f), "--json", check=True).stdout)["changed"] == 0
    # The WAN peer cannot reach the guest, even with a route to the guests' subnet.
    assert witness.run(wan, "ping", "-c2", "-W1", "10.0.0.11", check=False).returncode != 0
    subprocess.run(["ip", "-n", wan, "route", "add", "10.0.0.0/24", "via", "203.0.113.1"], check=True)
    assert witness.run(wan, "ping", "-c2", "-W1", "10.0.0.11", check=False).returncode != 0
    ping(g1, "203.0.113.2")
    cli("down", "-c", str(f), check=True)
    assert not {host, wan, g1} & netns_list()


def test_host_mode_moves_and_restores_the_uplink_address(labs, netns_factory, tmp_path):
    """mode: host acts on the namespace the CLI runs in; here a scratch one standing in for a real host, whose eth1
    has an address and the default route. Refused without --force; with it the address and the route move to br0;
    `down` puts them back on eth1 and leaves the host as it was."""
    import sys
    hostns, lan = netns_factory("ksh"), netns_factory("ksw")
    sh = lambda *a: subprocess.run(["ip", "-n", hostns, *a], check=True)  # noqa: E731
    sh("link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", lan)
    sh("addr", "add", "192.168.98.100/24", "dev", "eth1")
    sh("link", "set", "eth1", "up")
    sh("route", "add", "default", "via", "192.168.98.1")
    subprocess.run(["ip", "-n", lan, "addr", "add", "192.168.98.3/24", "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", lan, "link", "set", "eth0", "up"], check=True)
    d = {"name": f"{hostns}-lab", "mode": "host",
         "bridges": [{"name": "br0", "address": "192.168.98.100/24", "ports": ["eth1"]}],
         "uplink": {"name": "eth1"},
         "guests": [{"name": "g1", "kind": "netns", "tap": "g1h", "bridge": "br0", "address": "192.168.98.21/24",
                     "netns": f"{hostns}-g1"}]}
    labs.names.add(d["name"])
    labs.netns.add(f"{hostns}-g1")
    f = labs.write(d)
    # nsenter, not `ip netns exec`: that also gives a private mount namespace, where the light guest's namespace
    # bind mount would stay invisible to everyone else.
    run = lambda *a: subprocess.run(["nsenter", f"--net=/run/netns/{hostns}", sys.executable, "-m",  # noqa: E731
                                     "kvmnet.setup.cli", *a], capture_output=True, text=True)
    p = run("up", "-c", str(f))
    assert p.returncode == 2 and "eth1 carries the default route" in p.stderr, p.stderr
    assert "br0" not in witness.links(hostns)
    p = run("up", "-c", str(f), "--force")
    assert p.returncode == 0, p.stderr
    assert addrs(hostns, "eth1") == [] and addrs(hostns, "br0") == ["192.168.98.100/24"]
    routes = json.loads(subprocess.run(["ip", "-n", hostns, "-j", "route", "show", "default"], capture_output=True,
                                       text=True, check=True).stdout)
    assert [(r["gateway"], r["dev"]) for r in routes] == [("192.168.98.1", "br0")]
    ping(lan, "192.168.98.21")                                        # LAN -> eth1 -> br0 -> light guest
    assert json.loads(run("up", "-c", str(f), "--json").stdout)["changed"] == 0
    p = run("down", "-c", str(f))
    assert p.returncode == 0, p.stderr
    links = witness.links(hostns)
    assert "br0" not in links and "g1h" not in links and "master" not in links["eth1"]
    assert addrs(hostns, "eth1") == ["192.168.98.100/24"]            # the address is back where it was
    routes = json.loads(subprocess.run(["ip", "-n", hostns, "-j", "route", "show", "default"], capture_output=True,
                                       text=True, check=True).stdout)
    assert [(r["gateway"], r["dev"]) for r in routes] == [("192.168.98.1", "eth1")]
    assert f"{hostns}-g1" not in netns_list()
