"""Metrics listen-address policy, the exposition of a snapshot, the log formats."""

from __future__ import annotations

import io
import json
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.agent import logs, metrics
from controlplane.agent.snapshot import KernelView, Outcome, Snapshot
from controlplane.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:9108", ("127.0.0.1", 9108)), ("[::1]:1", ("::1", 1))],
)
def test_loopback_accepted(value: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_listen(value, allow_remote=False) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0.0.0.0:9108", "not a loopback"),
        ("192.0.2.1:9108", "not a loopback"),
        ("localhost:9108", "IP address"),
        ("127.0.0.1", "HOST:PORT"),
        ("127.0.0.1:0", "1..65535"),
        ("127.0.0.1:99999", "1..65535"),
        # issue 15 (F10): str.isdigit() digits that int() refuses (was exit 70)
        ("127.0.0.1:\u00b9", "HOST:PORT"),
        ("127.0.0.1:\u0661\u0660", "HOST:PORT"),
        ("127.0.0.1:" + "9" * 5000, "HOST:PORT"),
    ],
)
def test_refused(value: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        metrics.parse_listen(value, allow_remote=False)
    assert info.value.issues[0].path == "--metrics"


def test_remote_needs_explicit_flag() -> None:
    assert metrics.parse_listen("0.0.0.0:9108", allow_remote=True) == ("0.0.0.0", 9108)


SNAP = Snapshot(
    version="9.9",
    pid=1,
    netns="ns1",
    config_path="/c.yaml",
    config_sha256="x",
    started_at=100.0,
    table="inet offloadctl",
    last_reload=Outcome(at=200.0, ok=False, source="sighup", error="bad"),
    applies={"ok": 3},
    reloads={"failed": 1},
    kernel=KernelView(
        at=1.0, table_present=True, flowtables={"ft": ("a", "b")}, conntrack=7, offloaded=5
    ),
    invalidation={"by_cause": {"fdb_move": 4}, "events": 10, "overflows": 1, "resyncs": 1},
)


def test_exposition() -> None:
    reg = CollectorRegistry()
    reg.register(metrics.SnapshotCollector(lambda: SNAP))
    text = generate_latest(reg).decode()
    for line in (
        'offloadctl_agent_info{netns="ns1",version="9.9"} 1.0',
        'offloadctl_applies_total{result="ok"} 3.0',
        'offloadctl_reloads_total{result="failed"} 1.0',
        "offloadctl_last_reload_success 0.0",
        'offloadctl_flowtable_devices{flowtable="ft"} 2.0',
        "offloadctl_offloaded_flows 5.0",
        'offloadctl_invalidations_total{cause="fdb_move"} 4.0',
        "offloadctl_watch_overflows_total 1.0",
    ):
        assert line in text, line
    assert "offloadctl_last_apply_success" not in text  # no apply yet: no sample


def test_serve_over_http() -> None:
    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = metrics.serve(("127.0.0.1", port), lambda: SNAP)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"offloadctl_conntrack_entries 7.0" in resp.read()
    finally:
        stop()


def test_json_log_is_one_object_per_line() -> None:
    buf = io.StringIO()
    log = logs.DecisionLog(logs.setup("json", buf))
    log.error("reload", "invalid config\nsecond line", source="sighup", problems="a: b")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["level"] == "error" and doc["event"] == "reload" and doc["source"] == "sighup"
    assert doc["msg"] == "invalid config\nsecond line" and doc["ts"].endswith("Z")


def test_plain_log() -> None:
    buf = io.StringIO()
    log = logs.DecisionLog(logs.setup("plain", buf))
    log.info("apply", "committed: no changes", source="start", ms=1.5, path="a b")
    line = buf.getvalue().rstrip("\n")
    assert line.endswith('info apply: committed: no changes [source=start ms=1.5 path="a b"]')


def test_plain_log_stays_on_one_line() -> None:
    buf = io.StringIO()
    log = logs.DecisionLog(logs.setup("plain", buf))
    log.error("reload", "invalid config\n  a: b", problems="x\ny")
    assert buf.getvalue().count("\n") == 1
    assert 'reload: invalid config; a: b [problems="x\\ny"]' in buf.getvalue()
