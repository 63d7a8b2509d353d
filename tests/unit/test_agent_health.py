"""The health verdicts (pure) and their routing in front of the metrics app."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from controlplane.agent.health import Health, Verdict, liveness, readiness, watchdog_period
from controlplane.agent.snapshot import KernelView, Outcome, Snapshot

SNAP = Snapshot(
    version="0",
    pid=1,
    netns=None,
    config_path="/etc/offloadctl/agent.yaml",
    config_sha256="abc",
    started_at=0.0,
    table="inet offloadctl",
    last_apply=Outcome(at=100.0, ok=True, source="start"),
    kernel=KernelView(at=100.0, table_at=100.0, table_present=True),
    invalidation={"enabled": True},
)


def test_liveness_is_the_age_of_the_last_loop_iteration() -> None:
    assert liveness(now=130.0, last_beat=100.0, stale_after=30.0).ok
    dead = liveness(now=130.5, last_beat=100.0, stale_after=30.0)
    assert not dead.ok and dead.reasons == ("main loop stalled: last ran 30.5 s ago (limit 30 s)",)


def test_ready_needs_life_a_commit_the_table_and_the_watcher() -> None:
    ok = Verdict(True)
    assert readiness(ok, SNAP, wants_watcher=True) == Verdict(True)
    assert not readiness(Verdict(False, ("stalled",)), SNAP, True).ok
    assert readiness(ok, replace(SNAP, config_sha256=""), True).reasons == (
        "no config committed yet",
    )
    gone = replace(SNAP, kernel=replace(SNAP.kernel, table_at=200.0, table_present=False))
    assert readiness(ok, gone, True).reasons == (
        "table inet offloadctl absent in the latest kernel view",
    )
    # a commit after that view put the table back
    assert readiness(
        ok, replace(gone, last_apply=Outcome(at=201.0, ok=True, source="control")), True
    ).ok
    # ...a refused one did not
    assert not readiness(
        ok, replace(gone, last_apply=Outcome(at=201.0, ok=False, source="control")), True
    ).ok
    no_watcher = replace(SNAP, invalidation={"enabled": False})
    assert not readiness(ok, no_watcher, wants_watcher=True).ok
    assert readiness(ok, no_watcher, wants_watcher=False).ok


def call(app: Callable[..., Iterable[bytes]], path: str) -> tuple[str, bytes]:
    seen: list[str] = []
    body = b"".join(app({"PATH_INFO": path}, lambda status, _headers: seen.append(status)))
    return seen[0], body


def test_probes_in_front_of_the_exporter() -> None:
    now = [0.0]
    h = Health(lambda: SNAP, lambda: True, stale_after=5.0, monotonic=lambda: now[0])

    def metrics(_env: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        start("200 OK", [])
        return [b"metrics"]

    app = h.wsgi(metrics)
    assert call(app, "/healthz") == ("200 OK", b"ok\n")
    assert call(app, "/metrics") == ("200 OK", b"metrics")
    now[0] = 6.0  # no beat for 6 s
    status, body = call(app, "/healthz")
    assert status.startswith("503") and b"stalled" in body
    assert call(app, "/readyz")[0].startswith("503")
    assert call(app, "/metrics") == ("200 OK", b"metrics")  # the exporter does not know
    h.beat()
    assert call(app, "/healthz") == ("200 OK", b"ok\n")
    assert call(app, "/readyz") == ("200 OK", b"ok\n")


def test_watchdog_period_is_half_of_what_systemd_asks() -> None:
    assert watchdog_period({"WATCHDOG_USEC": "90000000"}, pid=7) == 45.0
    assert watchdog_period({"WATCHDOG_USEC": "90000000", "WATCHDOG_PID": "7"}, pid=7) == 45.0
    assert watchdog_period({"WATCHDOG_USEC": "90000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_period({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_period({"WATCHDOG_USEC": "x"}, pid=7) is None
    assert watchdog_period({}, pid=7) is None
