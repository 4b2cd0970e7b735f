"""The hand-written exposition must parse the way Prometheus' own parser reads it, and pass promtool."""
import asyncio
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmnet.exporter import scrape
from kvmnet.exporter.exposition import MetricFamily, format_value, labels, render


def test_round_trip_through_client_python_parser():
    a = MetricFamily("kvmnet_port_receive_bytes_total", "counter", "Bytes.\nSecond line.")
    a.add(labels(netns="ns1", device='we"ird\\name\n'), 12345678901234)
    b = MetricFamily("kvmnet_port_receive_bytes_total", "counter", "Bytes.")
    b.add(labels(netns="ns2", device="vm1eth0"), 0.5)
    h = MetricFamily("kvmnet_guest_ping_rtt_seconds", "histogram", "RTT.")
    h.add_histogram(labels(guest="vm1"), [1e-5, 1e-3], [1, 3], 0.0021, 4)
    fams = {f.name: f for f in text_string_to_metric_families(render([a, b, h]).decode())}
    rx = fams["kvmnet_port_receive_bytes"]
    assert [(s.labels["netns"], s.labels["device"], s.value) for s in rx.samples] == [
        ("ns1", 'we"ird\\\\name\\x0a', 12345678901234), ("ns2", "vm1eth0", 0.5)]
    rtt = fams["kvmnet_guest_ping_rtt_seconds"]
    buckets = [(s.labels["le"], s.value) for s in rtt.samples if s.name.endswith("_bucket")]
    assert buckets == [("1e-05", 1), ("0.001", 3), ("+Inf", 4)]


def test_same_name_different_type_is_an_error():
    with pytest.raises(ValueError, match="kvmnet_x"):
        render([MetricFamily("kvmnet_x", "gauge", "x"), MetricFamily("kvmnet_x", "counter", "x")])


def test_unrenderable_families_are_dropped_and_reported_the_rest_served():
    ok = MetricFamily("kvmnet_ok", "gauge", "ok")
    ok.add(labels(device="br\udcff"), 1)
    clash = [MetricFamily("kvmnet_x", "gauge", "x"), MetricFamily("kvmnet_x", "counter", "x")]
    bad_help = MetricFamily("kvmnet_h", "gauge", "help \udcff")  # a help text that is not encodable
    bad_name = MetricFamily("kvmnet bad", "gauge", "x")
    bad_value = MetricFamily("kvmnet_v", "gauge", "x")
    bad_value.add(labels(device="a"), 1)
    bad_value.add(labels(device="b"), None)  # a collector bug: one value that is not a number
    errors = []
    out = render([ok, *clash, bad_help, bad_name, bad_value], lambda fam, why: errors.append(fam))
    assert sorted(errors) == ["kvmnet bad", "kvmnet_h", "kvmnet_v", "kvmnet_x"]
    fams = list(text_string_to_metric_families(out.decode()))
    assert [(f.name, f.samples[0].labels) for f in fams] == [("kvmnet_ok", {"device": "br\\xff"})]


@pytest.mark.parametrize("value,text", [(3, "3"), (2.0, "2"), (0.25, "0.25"), (float("inf"), "+Inf"),
                                        (float("nan"), "NaN"), (1e20, "1e+20"), (True, "1")])
def test_format_value(value, text):
    assert format_value(value) == text


def test_promtool_accepts_output(tmp_path):
    fam = MetricFamily("kvmnet_bridge_up", "gauge", "Bridge carrier.")
    fam.add(labels(netns="", bridge="br0"), 1)
    out = render([fam])
    res = subprocess.run(["promtool", "check", "metrics"], input=out, capture_output=True)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res


class _Ok:
    name, netns = "good", "ns"

    def collect(self):
        f = MetricFamily("kvmnet_ok", "gauge", "ok")
        f.add(labels(netns="ns"), 1)
        return [f]


class _Broken:
    name, netns = "bad", "gone"

    def collect(self):
        raise OSError("network namespace 'gone' does not exist")


class _Empty:
    name, netns = "empty", ""

    def collect(self):
        raise scrape.ExpectedAbsence("no libvirt here")


def test_one_failing_collector_does_not_sink_the_scrape(caplog):
    fams = asyncio.run(scrape.scrape([_Ok(), _Broken(), _Empty()]))
    text = render(fams).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["kvmnet_ok"].samples[0].value == 1
    success = {s.labels["collector"]: s.value for s in parsed["kvmnet_scrape_collector_success"].samples}
    assert success == {"good": 1, "bad": 0, "empty": 1}
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "collector=bad" in errors[0].getMessage()
