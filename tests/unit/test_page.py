"""The operator's page (exporter/page.py) from exposition text: what each table shows, rates between two samples,
and escaping of hostile names. The page in a real browser on a real lab: tests/e2e/test_alerting_live.py."""
from __future__ import annotations

import html.parser

from kvmnet.exporter import page


def body(rx: int, req: int, rep: int, rtt_sum: float, rtt_n: int, odd: str = "<script>x</script>") -> bytes:
    odd_esc = odd.replace("\\", "\\\\").replace('"', '\\"')
    return f"""# TYPE kvmnet_bridge_up gauge
kvmnet_bridge_up{{netns="lab",bridge="br0"}} 1
kvmnet_bridge_ports{{netns="lab",bridge="br0"}} 2
kvmnet_bridge_receive_bytes_total{{netns="lab",bridge="br0"}} {rx}
kvmnet_bridge_transmit_bytes_total{{netns="lab",bridge="br0"}} 0
kvmnet_port_info{{netns="lab",bridge="br0",device="vm1eth0",kind="tap",mac="fe:00:00:00:00:01",guest="vm1"}} 1
kvmnet_port_info{{netns="lab",bridge="br0",device="{odd_esc}",kind="tap",mac="fe:00:00:00:00:02",guest=""}} 1
kvmnet_port_up{{netns="lab",bridge="br0",device="vm1eth0"}} 0
kvmnet_port_up{{netns="lab",bridge="br0",device="{odd_esc}"}} 1
kvmnet_port_receive_bytes_total{{netns="lab",bridge="br0",device="vm1eth0"}} {rx}
kvmnet_port_transmit_bytes_total{{netns="lab",bridge="br0",device="vm1eth0"}} 0
kvmnet_port_receive_dropped_total{{netns="lab",bridge="br0",device="vm1eth0"}} 0
kvmnet_port_transmit_dropped_total{{netns="lab",bridge="br0",device="vm1eth0"}} 0
kvmnet_port_stp_state{{netns="lab",bridge="br0",device="vm1eth0",state="forwarding"}} 1
kvmnet_port_stp_state{{netns="lab",bridge="br0",device="vm1eth0",state="blocking"}} 0
kvmnet_guest_up{{netns="lab",guest="vm1"}} 0
kvmnet_guest_up{{netns="lab",guest="vm2"}} 1
kvmnet_guest_info{{netns="lab",guest="vm2",address="10.0.0.12",mac="0a:00:00:00:00:02",bridge="br0",device="vm2eth0"}} 1
kvmnet_guest_state{{netns="lab",guest="vm2",state="running"}} 1
kvmnet_guest_state{{netns="lab",guest="vm2",state="paused"}} 0
kvmnet_guest_ping_requests_total{{netns="lab",guest="vm2"}} {req}
kvmnet_guest_ping_replies_total{{netns="lab",guest="vm2"}} {rep}
kvmnet_guest_ping_rtt_seconds_sum{{netns="lab",guest="vm2"}} {rtt_sum}
kvmnet_guest_ping_rtt_seconds_count{{netns="lab",guest="vm2"}} {rtt_n}
kvmnet_scrape_collector_success{{collector="bridge",netns="gone"}} 0
""".encode("utf-8", "surrogateescape")


class Cells(html.parser.HTMLParser):
    """Rows of every table as lists of cell texts; also records any <script> start tag."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.scripts = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def rendered(prev: bytes | None, cur: bytes, dt: float = 10.0) -> Cells:
    p = page.parse(prev, 100.0) if prev is not None else None
    c = page.parse(cur, 100.0 + dt)
    cells = Cells()
    cells.feed(page.render(p, c, "1.0"))
    return cells


def row(cells: Cells, first: str, second: str) -> list[str]:
    return next(r for r in cells.rows if r[:2] == [first, second] or r[1:3] == [first, second])


def test_tables_show_state_and_rates():
    c = rendered(body(1000, 100, 100, 0.1, 100), body(11000, 110, 105, 0.15, 105))
    br = row(c, "lab", "br0")
    assert br[2] == "up" and br[3] == "2" and br[4] == "8.0 kbit/s"          # 10000 bytes in 10 s
    port = row(c, "br0", "vm1eth0")
    assert port[3:7] == ["tap", "vm1", "down", "forwarding"] and port[7] == "8.0 kbit/s"
    vm1 = row(c, "lab", "vm1")
    assert vm1[4] == "down"
    vm2 = row(c, "lab", "vm2")
    assert vm2[2:6] == ["10.0.0.12", "vm2eth0", "up", "running"]
    assert vm2[6] == "10.00 ms" and vm2[7] == "50 %"                        # 0.05 s / 5 replies; 5 of 10 lost


def test_first_sample_has_no_rates():
    c = rendered(None, body(1000, 100, 100, 0.1, 100))
    assert row(c, "lab", "br0")[4] == "\u2014"
    assert row(c, "lab", "vm2")[7] == "\u2014"


def test_counter_reset_gives_no_rate():
    c = rendered(body(5000, 100, 100, 0.1, 100), body(10, 110, 110, 0.2, 110))
    assert row(c, "lab", "br0")[4] == "\u2014"


def test_hostile_and_non_utf8_names_are_escaped():
    odd = '<script>alert("x")</script>&\udcff'          # \udcff: the byte 0xff, surrogate-escaped
    text = page.render(None, page.parse(body(0, 0, 0, 0, 0, odd=odd), 1.0))
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;\\xff" in text
    text.encode("utf-8")  # no surrogates left: the page is valid UTF-8
    c = Cells()
    c.feed(text)
    assert c.scripts == 0


def test_failing_collectors_are_listed():
    text = page.render(None, page.parse(body(0, 0, 0, 0, 0), 1.0))
    assert 'id="collectors"' in text and "gone" in text


def test_no_external_assets_and_no_javascript():
    text = page.render(None, page.parse(body(0, 0, 0, 0, 0), 1.0))
    assert "<script" not in text and "src=" not in text and "http://" not in text and "https://" not in text
    assert '<meta http-equiv="refresh"' in text
