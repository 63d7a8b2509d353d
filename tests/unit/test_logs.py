"""One log format for the agent and `offloadctl watch` (issue 14): logfmt with an
RFC 3339 ts (none under journald), JSON lines with ts, unique keys, one line."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile

import pytest

from controlplane.agent import logs

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_plain_is_logfmt_with_an_rfc3339_ts() -> None:
    buf = io.StringIO()
    log = logs.DecisionLog(logs.setup("plain", buf))
    log.info("apply", "committed: no changes", source="start", ms=1.5, path="a b")
    line = buf.getvalue().rstrip("\n")
    assert re.fullmatch(
        rf'ts={TS} level=info event=apply msg="committed: no changes" source=start'
        r' ms=1.5 path="a b"',
        line,
    ), line


def test_plain_stays_on_one_line_and_quotes_what_needs_it() -> None:
    buf = io.StringIO()
    log = logs.DecisionLog(logs.setup("plain", buf))
    log.error("reload", "invalid config\n  a: b", problems="x\ny", eq="k=v", q='say "hi"')
    out = buf.getvalue()
    assert out.count("\n") == 1
    assert 'msg="invalid config; a: b" problems="x\\ny" eq="k=v" q="say \\"hi\\""' in out


def test_head_keys_come_first() -> None:
    line = logs.logfmt({"a": 1, "event": "x", "msg": "m", "level": "info", "ts": "t"})
    assert line == "ts=t level=info event=x msg=m a=1"


def test_watch_events_name_devices_and_say_event_once() -> None:
    """`event=` and `kind=` carried the same value; bridges and ports were ifindexes."""
    from controlplane.core.events import FdbEntryChanged
    from controlplane.service.invalidation import _describe

    names = {5: "br0", 3: "p1"}
    event = FdbEntryChanged(bridge=5, vlan=0, mac="02:00:00:00:00:01", port=3)
    record = {"event": type(event).__name__} | _describe(event, lambda i: names.get(i, str(i)))
    line = logs.line(record, "plain", 0.0)
    assert line == (
        "ts=1970-01-01T00:00:00.000Z event=FdbEntryChanged bridge=br0 bridge_ifindex=5"
        " vlan=0 mac=02:00:00:00:00:01 port=p1 port_ifindex=3"
    )


def test_lists_and_bools_are_values() -> None:
    assert logs.logfmt({"causes": ["a b", "c"], "ok": True}) == 'causes="a b,c" ok=true'


def test_json_is_one_object_per_line_with_ts_first() -> None:
    buf = io.StringIO()
    log = logs.DecisionLog(logs.setup("json", buf))
    log.error("reload", "invalid config\nsecond line", source="sighup", changes=["+ a", "- b"])
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert list(doc)[:4] == ["ts", "level", "event", "msg"] and re.fullmatch(TS, doc["ts"])
    assert doc["msg"] == "invalid config\nsecond line" and doc["changes"] == ["+ a", "- b"]


def test_watch_lines_carry_ts_in_both_formats() -> None:
    record = {"event": "FdbEntryChanged", "bridge": "br0", "bridge_ifindex": 5}
    plain = logs.line(record, "plain", 0.25)
    assert plain == "ts=1970-01-01T00:00:00.250Z event=FdbEntryChanged bridge=br0 bridge_ifindex=5"
    assert json.loads(logs.line(record, "json", 0.25))["ts"] == "1970-01-01T00:00:00.250Z"
    assert logs.line(record, "plain", 0.25, stamp=False).startswith("event=")


@pytest.mark.parametrize("matches", [True, False])
def test_journald_is_the_sink_only_for_its_own_stream(
    matches: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tempfile.TemporaryFile("w+") as stream:
        st = os.fstat(stream.fileno())
        ino = st.st_ino if matches else st.st_ino + 1
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{ino}")
        assert logs.journald_is_sink(stream) is matches
        logger = logs.setup("plain", stream)
        logs.DecisionLog(logger).info("start", "running")
        stream.seek(0)
        assert stream.read().startswith("ts=") is not matches
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logs.journald_is_sink(io.StringIO())
