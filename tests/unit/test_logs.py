"""Log lines: logfmt with ts/level/event, the same keys as JSON."""
import io
import json
import logging

from kvmnet.exporter import logs


def capture(fmt: str):
    buf = io.StringIO()
    logs.setup("debug", fmt, stream=buf)
    return buf


def test_logfmt_and_json_carry_the_same_fields():
    for fmt in ("logfmt", "json"):
        buf = capture(fmt)
        log = logging.getLogger("kvmnet.test")
        logs.event(log, "listening", address=":9848", note='has "quotes" and spaces')
        log.error("event=collector_failed collector=%s netns=%s error=%r", "bridge", "ns1", "gone away")
        log.info("not logfmt at all: %d%%", 5)
        lines = buf.getvalue().splitlines()
        assert len(lines) == 3
        parsed = [json.loads(l) if fmt == "json" else logs.parse_logfmt(l) for l in lines]
        assert parsed[0]["event"] == "listening" and parsed[0]["address"] == ":9848"
        assert parsed[0]["note"] == 'has "quotes" and spaces' and parsed[0]["level"] == "info"
        assert parsed[1] == {**parsed[1], "event": "collector_failed", "collector": "bridge", "netns": "ns1",
                             "error": "gone away", "level": "error"}
        assert parsed[2]["msg"] == "not logfmt at all: 5%"
        assert all(p["ts"].endswith("Z") for p in parsed)


def test_quote():
    assert logs.quote("plain") == "plain"
    assert logs.quote("") == '""'
    assert logs.quote('a "b"\nc') == '"a \\"b\\"\\nc"'
    assert logs.parse_logfmt(f"k={logs.quote('a b=c')}") == {"k": "a b=c"}
