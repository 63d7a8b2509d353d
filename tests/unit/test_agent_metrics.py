"""Metrics listen-address policy and the exposition of a snapshot (Prometheus conventions)."""

from __future__ import annotations

import re
import socket
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.agent import metrics
from controlplane.agent.invalidation import CAUSE_KINDS
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
    invalidation={"by_cause": {"fdb": 4}, "events": 10, "overflows": 1, "resyncs": 1},
    control={"requests": 7, "errors": 0, "refused": 1, "timeouts": 0},
    drift_repairs=2,
)
SNAP = replace(
    SNAP,
    kernel=replace(
        SNAP.kernel,
        forwarded={
            "fast": {"packets": 90, "bytes": 9000},
            "classic": {"packets": 10, "bytes": 1000},
        },
    ),
)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "agent.md"


def _text(snap: Snapshot = SNAP) -> str:
    reg = CollectorRegistry()
    reg.register(metrics.SnapshotCollector(lambda: snap))
    return generate_latest(reg).decode()


def test_exposition() -> None:
    text = _text()
    for line in (
        'offloadctl_agent_info{netns="ns1",version="9.9"} 1.0',
        'offloadctl_applies_total{result="ok"} 3.0',
        'offloadctl_reloads_total{result="failed"} 1.0',
        "offloadctl_last_reload_success 0.0",
        'offloadctl_flowtable_devices{flowtable="ft"} 2.0',
        "offloadctl_offloaded_flows 5.0",
        'offloadctl_invalidations_total{cause="fdb"} 4.0',
        "offloadctl_watch_overflows_total 1.0",
        'offloadctl_forwarded_packets_total{path="fast"} 90.0',
        'offloadctl_forwarded_bytes_total{path="classic"} 1000.0',
        "offloadctl_drift_repairs_total 2.0",
        "offloadctl_control_requests_total 7.0",
        "offloadctl_control_refused_total 1.0",
    ):
        assert line in text, line
    assert "offloadctl_last_apply_success" not in text  # no apply yet: no sample


# An agent that has just started: nothing happened yet.
FRESH = replace(
    SNAP,
    last_reload=None,
    applies={},
    reloads={},
    kernel=KernelView(),
    invalidation={},
    control={},
    drift_repairs=0,
    flowtable_names=("ft", "other"),
    reuseport={"web": {}},
)


def test_labelled_series_exist_at_zero_from_the_start() -> None:
    """absent()/rate() alerts need a series before the first event (issue 14)."""
    text = _text(FRESH)
    for line in (
        'offloadctl_applies_total{result="ok"} 0.0',
        'offloadctl_applies_total{result="failed"} 0.0',
        'offloadctl_reloads_total{result="ok"} 0.0',
        'offloadctl_reloads_total{result="failed"} 0.0',
        'offloadctl_flowtable_devices{flowtable="ft"} 0.0',
        'offloadctl_flowtable_devices{flowtable="other"} 0.0',
        'offloadctl_forwarded_packets_total{path="fast"} 0.0',
        'offloadctl_forwarded_packets_total{path="classic"} 0.0',
        'offloadctl_reuseport_program_total{group="web",outcome="migrated_request"} 0.0',
        "offloadctl_drift_repairs_total 0.0",
        "offloadctl_control_errors_total 0.0",
        "offloadctl_watch_pruned_total 0.0",
    ):
        assert line in text, line
    for cause in CAUSE_KINDS:
        assert f'offloadctl_invalidations_total{{cause="{cause}"}} 0.0' in text, cause


def _families(text: str) -> dict[str, tuple[str, str]]:
    """name -> (type, help) from the exposition."""
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, re.M))
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    out = {}
    for name, kind in types.items():
        out[name] = (kind, helps[name])
    return out


def test_docs_table_is_the_registry() -> None:
    """Every series in docs/agent.md's one table, with its type and labels, and
    nothing else; the exposition has exactly these families."""
    rows = {}
    doc = DOCS.read_text()
    table = doc[doc.index("| metric | type | labels | what is counted |") :]
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        name, kind, labels, what = (c.strip() for c in line.strip("|").split("|"))
        rows[name.strip("`")] = (kind, tuple(re.findall(r"`(\w+)`", labels)), what)
    specs = {s.name: (s.kind, s.labels, s.help) for s in metrics.SPECS}
    assert rows == specs
    full = replace(SNAP, last_apply=Outcome(at=1.0, ok=True, source="start"))
    exposed = _families(_text(full))
    assert {n: k for n, (k, _h) in exposed.items()} == {n: s[0] for n, s in specs.items()}


def test_one_metric_per_meaning_and_helps_that_say_what_is_counted() -> None:
    for spec in metrics.SPECS:
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert "kind" not in spec.labels, spec.name  # a total mixed with its subsets
        assert len(spec.help.split()) >= 5 and spec.help.endswith("."), spec


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
