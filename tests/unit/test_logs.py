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


def test_odd_names_never_split_a_log_line_and_round_trip():
    import io
    import logging as _logging

    from kvmnet.common.logfmt import parse_logfmt, quote
    from kvmnet.exporter import logs as _logs
    for v in ["br\udcff", "a\nb", "c\x01d\x7f", 'q"\\', "\\xff", "tab\there", "é€"]:
        assert parse_logfmt("k=" + quote(v)) == {"k": v}
        assert "\n" not in quote(v) and quote(v).encode()  # one line, valid UTF-8
    buf = io.StringIO()
    _logs.setup("info", "logfmt", stream=buf)
    try:
        _logging.getLogger("kx.test").info("event=odd netns=%s", "ns\udcff\x01")  # a bare %s, unquoted
    finally:
        _logs.setup("info", "logfmt", stream=io.StringIO())
    line = buf.getvalue()
    assert line.count("\n") == 1 and line.encode() and "netns=ns\\xff\\x01" in line


def test_odd_names_in_json_logs_are_one_line_of_valid_json():
    import io
    import json
    import logging as _logging

    from kvmnet.exporter import logs as _logs
    buf = io.StringIO()
    _logs.setup("info", "json", stream=buf)
    try:
        _logs.event(_logging.getLogger("kx.test"), "odd", netns="ns\udcff\n\x01", guest='a"b\\')
    finally:
        _logs.setup("info", "logfmt", stream=io.StringIO())
    line = buf.getvalue()
    assert line.count("\n") == 1 and line.encode("utf-8")
    obj = json.loads(line)
    assert obj["netns"] == "ns\udcff\n\x01" and obj["guest"] == 'a"b\\'
