"""The agent's decisions with fake kernel ports: reload keeps the running config
on bad input, answers with field errors, records state only after a commit."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from controlplane.agent import daemon, logs, protocol
from controlplane.agent import state as state_mod
from controlplane.agent.daemon import Agent, AgentOptions
from controlplane.agent.ports import ApplyOutcome
from controlplane.agent.snapshot import KernelView
from controlplane.agent.state import AppliedState, StateError
from controlplane.config import Config
from controlplane.core.flowpath import Link
from controlplane.errors import ConfigError, EnvironmentProblem, KernelError

GOOD = "version: 1\nnat:\n  masquerade: [{oifname: wan0}]\n"
OTHER = "version: 1\nnat:\n  masquerade: [{oifname: wan1}]\n"
BAD = "version: 1\nnat:\n  masquerade: [{oifname: 'wan0; drop'}]\n"


@dataclass
class FakeApplier:
    """Holds the 'kernel' config; a refusal leaves it as it was (like one transaction)."""

    kernel: Config | None = None
    refuse: Exception | None = None
    applied: list[Config] = field(default_factory=list)
    cleaned: int = 0
    settled: int = 0
    links_hint: Mapping[int, Link] | None = None  # for the next apply only, as the real one

    def apply(self, cfg: Config, netns: str | None, owned: AppliedState | None) -> ApplyOutcome:
        if self.refuse is not None:
            raise self.refuse
        changed = cfg != self.kernel
        self.kernel = cfg
        self.applied.append(cfg)
        groups = {g.name: {"prog_id": 1} for g in cfg.reuseport.groups}
        return ApplyOutcome(changed, ("+ table inet offloadctl",) if changed else (), 0.001, groups)

    def cleanup(self, cfg: Config, netns: str | None, owned: AppliedState | None) -> list[str]:
        self.kernel = None
        self.cleaned += 1
        return ["deleted table inet offloadctl"]

    def settle(self) -> None:
        self.settled += 1

    def plan_next_from(self, links: Mapping[int, Link]) -> None:
        self.links_hint = links


class FakeObserver:
    def __init__(self) -> None:
        self.full = 0  # conntrack dumps (observe) taken
        self.asked: tuple[Any, bool] | None = None

    def observe(self, cfg: Config, netns: str | None) -> KernelView:
        self.full += 1
        return KernelView(at=1.0, table_at=1.0, table_present=True, conntrack=3, offloaded=2)

    def observe_table(self, cfg: Config, netns: str | None) -> KernelView:
        return KernelView(table_at=2.0, table_present=True, flowtables={"ft": ("lan0", "tap1")})

    def flows(
        self, cfg: Config, netns: str | None, limit: int, selector: Any, offloaded: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        self.asked = (selector, offloaded)
        flows = [{"id": i} for i in range(5)]
        return flows[:limit], len(flows) > limit


@pytest.fixture
def logbuf() -> io.StringIO:
    return io.StringIO()


def make_agent(
    tmp_path: Path,
    logbuf: io.StringIO,
    text: str = GOOD,
    *,
    observer: FakeObserver | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    **opts: Any,
) -> tuple[Agent, FakeApplier, Path]:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    applier = FakeApplier()
    log = logs.DecisionLog(logs.setup("json", logbuf))
    agent = Agent(
        AgentOptions(cfg, state_path=tmp_path / "state.json", **opts),
        applier,
        observer or FakeObserver(),
        log,
        monotonic=monotonic,
    )
    return agent, applier, cfg


def answer(agent: Agent, op: str, **args: Any) -> dict[str, Any]:
    doc = json.loads(agent.handle(protocol.Request(op, args)))  # type: ignore[arg-type]
    assert isinstance(doc, dict)
    return doc


def log_lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_start_applies_and_records_state(tmp_path: Path, logbuf: io.StringIO) -> None:
    agent, applier, _ = make_agent(tmp_path, logbuf)
    agent.start()
    assert applier.kernel is not None and applier.kernel.nat.masquerade[0].oifname == "wan0"
    saved = state_mod.load(tmp_path / "state.json")
    assert saved is not None and saved.config_sha256 == agent.running_sha != ""
    lines = log_lines(logbuf)
    assert lines[0]["event"] == "apply" and lines[0]["msg"].startswith("committed")


def test_start_refuses_future_state_before_touching_kernel(
    tmp_path: Path, logbuf: io.StringIO
) -> None:
    agent, applier, _ = make_agent(tmp_path, logbuf)
    (tmp_path / "state.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(StateError, match="schema 99"):
        agent.start()
    assert applier.applied == []


def test_start_with_invalid_config_fails_before_kernel(tmp_path: Path, logbuf: io.StringIO) -> None:
    agent, applier, _ = make_agent(tmp_path, logbuf, text=BAD)
    with pytest.raises(ConfigError):
        agent.start()
    assert applier.applied == [] and not (tmp_path / "state.json").exists()


def test_bad_reload_keeps_running_config_and_names_fields(
    tmp_path: Path, logbuf: io.StringIO
) -> None:
    agent, applier, cfg = make_agent(tmp_path, logbuf)
    agent.start()
    running, sha = agent.running, agent.running_sha
    state_before = (tmp_path / "state.json").read_bytes()
    cfg.write_text(BAD)
    doc = answer(agent, "reload")
    assert doc["ok"] is False and doc["error"]["code"] == "config_invalid"
    issue = doc["error"]["issues"][0]
    assert issue["path"] == "nat.masquerade[0].oifname" and issue["line"] == 3
    assert doc["error"]["exit_code"] == 2
    assert agent.running is running and agent.running_sha == sha
    assert applier.applied == [running]  # nothing sent to the kernel
    assert (tmp_path / "state.json").read_bytes() == state_before
    status = answer(agent, "status")["result"]
    assert status["last_reload"]["ok"] is False and status["reloads"] == {"failed": 1}
    assert status["last_apply"]["ok"] is True
    err = [line for line in log_lines(logbuf) if line["level"] == "error"]
    assert len(err) == 1 and "running config kept" in err[0]["msg"]
    assert any("nat.masquerade[0].oifname" in p for p in err[0]["problems"])  # a list field


def test_kernel_refusal_keeps_running_config(tmp_path: Path, logbuf: io.StringIO) -> None:
    agent, applier, cfg = make_agent(tmp_path, logbuf)
    agent.start()
    running = agent.running
    cfg.write_text(OTHER)
    applier.refuse = KernelError("apply", "Device or resource busy", 16)
    doc = answer(agent, "reload")
    assert doc["error"]["code"] == "apply_failed" and doc["error"]["exit_code"] == 5
    assert "EBUSY" in doc["error"]["message"] and "running config kept" in doc["error"]["message"]
    assert agent.running is running
    saved = state_mod.load(tmp_path / "state.json")
    assert saved is not None and saved.config_sha256 == agent.running_sha


def test_good_reload_commits_and_records(tmp_path: Path, logbuf: io.StringIO) -> None:
    agent, applier, cfg = make_agent(tmp_path, logbuf)
    agent.start()
    assert answer(agent, "reload")["result"]["changed"] is False  # unchanged: nothing to do
    cfg.write_text(OTHER)
    doc = answer(agent, "reload")
    assert doc["ok"] is True and doc["result"]["changed"] is True
    assert applier.kernel is not None and applier.kernel.nat.masquerade[0].oifname == "wan1"
    saved = state_mod.load(tmp_path / "state.json")
    assert saved is not None and saved.config_sha256 == agent.running_sha


def test_file_change_reloads_once_per_content(tmp_path: Path, logbuf: io.StringIO) -> None:
    agent, applier, cfg = make_agent(tmp_path, logbuf)
    agent.start()
    assert agent.config_file_changed() is None  # touched, same bytes: nothing
    cfg.write_text(BAD)
    first = agent.config_file_changed()
    assert first is not None and not first.ok
    assert agent.config_file_changed() is None  # the same bad bytes are not retried
    cfg.write_text(OTHER)
    out = agent.config_file_changed()
    assert out is not None and out.ok and len(applier.applied) == 2


def test_reuseport_groups_owned_in_state(tmp_path: Path, logbuf: io.StringIO) -> None:
    text = GOOD + "reuseport:\n  groups: [{name: web}]\n"
    agent, _, _ = make_agent(tmp_path, logbuf, text=text)
    agent.start()
    saved = state_mod.load(tmp_path / "state.json")
    assert saved is not None and saved.reuseport_groups == ("web",)
    assert answer(agent, "status")["result"]["reuseport"] == {"web": {"prog_id": 1}}


def test_stop_leaves_state_unless_cleanup(tmp_path: Path, logbuf: io.StringIO) -> None:
    agent, applier, _ = make_agent(tmp_path, logbuf)
    agent.start()
    agent.stop()
    assert applier.kernel is not None and applier.cleaned == 0
    assert (tmp_path / "state.json").exists()
    agent2, applier2, _ = make_agent(tmp_path, logbuf, cleanup_on_exit=True)
    agent2.start()
    agent2.stop()
    assert applier2.kernel is None and applier2.cleaned == 1
    assert not (tmp_path / "state.json").exists()


def test_flows_and_bad_limit(tmp_path: Path, logbuf: io.StringIO) -> None:
    observer = FakeObserver()
    agent, _, _ = make_agent(tmp_path, logbuf, observer=observer)
    agent.start()
    doc = answer(agent, "flows", limit=2)["result"]
    # Always the kernel (the observer's conntrack reading), never the invalidation index.
    assert doc == {"flows": [{"id": 0}, {"id": 1}], "truncated": True, "source": "conntrack"}
    for bad in (-1, "3", True):
        assert answer(agent, "flows", limit=bad)["error"]["code"] == "bad_request"
    answer(agent, "flows", selector={"kind": "ip", "value": "10.0.0.1"}, offloaded=True)
    assert observer.asked is not None
    assert (str(observer.asked[0]), observer.asked[1]) == ("ip 10.0.0.1", True)
    for bad_args in (
        {"selector": {"kind": "ip", "value": "10.0.0.300"}},
        {"selector": {"kind": "zone", "value": "1"}},
        {"selector": "ip"},
        {"offloaded": "yes"},
    ):
        error = answer(agent, "flows", **bad_args)["error"]
        assert error["code"] == "bad_request", bad_args


def test_status_opens_with_the_verdict(tmp_path: Path, logbuf: io.StringIO) -> None:
    agent, _, _ = make_agent(tmp_path, logbuf)
    agent.start()
    agent.refresh_kernel()
    doc = answer(agent, "status")["result"]
    assert next(iter(doc)) == "verdict"
    assert doc["verdict"].startswith(
        "kernel capability unknown (not probed yet); flowtable ft { lan0, tap1 };"
        " 0 of 0 forwarded flows offloaded"
    )


def test_handler_bug_is_answered_not_raised(tmp_path: Path, logbuf: io.StringIO) -> None:
    observer = FakeObserver()
    agent, _, _ = make_agent(tmp_path, logbuf, observer=observer)
    agent.start()

    def broken(*_args: Any) -> tuple[list[dict[str, Any]], bool]:
        raise ZeroDivisionError("oops")

    observer.flows = broken  # type: ignore[method-assign,assignment]
    assert answer(agent, "flows")["error"]["code"] == "internal"
    bug = [line for line in log_lines(logbuf) if "ZeroDivisionError" in line["msg"]]
    assert len(bug) == 1 and "Traceback" in bug[0]["traceback"]  # our bug: the log says where


def test_topology_change_replans_with_bounded_retries(tmp_path: Path, logbuf: io.StringIO) -> None:
    now = [1000.0]
    agent, applier, _ = make_agent(tmp_path, logbuf, monotonic=lambda: now[0])
    agent.start()
    running = agent.running
    applies = len(applier.applied)
    agent.reapply_if_needed()
    assert len(applier.applied) == applies  # nothing changed: no re-plan

    # A device vanishes between planning and commit twice, then the plan holds.
    failures = iter([EnvironmentProblem("flowtables[0].devices[1]: device 'tap9' vanished")] * 2)

    def flaky(cfg: Config, netns: str | None, owned: AppliedState | None) -> ApplyOutcome:
        err = next(failures, None)
        if err is not None:
            raise err
        return ApplyOutcome(True, ("+ device tap3",))

    applier.apply = flaky  # type: ignore[method-assign]
    agent.topology_changed()
    assert agent.reapply_deadline() is not None
    agent.reapply_if_needed()
    assert agent.running is running and agent.reapply_deadline() is None
    status = answer(agent, "status")["result"]
    assert status["last_apply"]["source"] == "topology"
    assert status["last_apply"]["summary"] == ["+ device tap3"]
    retries = [d["msg"] for d in log_lines(logbuf) if "re-planning against what exists" in d["msg"]]
    assert [m.split(" refused")[0] for m in retries] == ["attempt 1", "attempt 2"]

    # Failing every time: gives up after TOPOLOGY_ATTEMPTS, keeps running, says so.
    calls = []

    def broken(cfg: Config, netns: str | None, owned: AppliedState | None) -> ApplyOutcome:
        calls.append(cfg)
        raise EnvironmentProblem("device 'tap9' does not exist")

    applier.apply = broken  # type: ignore[method-assign]
    agent.topology_changed()
    agent.reapply_if_needed()
    assert calls == []  # within TOPOLOGY_MIN_GAP of the last re-plan: coalesced
    now[0] += daemon.TOPOLOGY_MIN_GAP
    agent.reapply_if_needed()
    assert len(calls) == daemon.TOPOLOGY_ATTEMPTS
    assert agent.running is running
    assert any("gave up after 3 attempts" in d["msg"] for d in log_lines(logbuf))


def test_status_reads_the_table_not_conntrack(tmp_path: Path, logbuf: io.StringIO) -> None:
    """A status request must not hold the loop on a conntrack dump: the table part
    is refreshed inline, the conntrack counts are the periodic view's."""
    observer = FakeObserver()
    agent, _, _ = make_agent(tmp_path, logbuf, observer=observer)
    agent.start()
    dumps = observer.full
    k = answer(agent, "status")["result"]["kernel"]
    assert observer.full == dumps
    assert k["flowtables"] == {"ft": ["lan0", "tap1"]} and k["conntrack"] == 3
    # An older periodic view published later keeps the fresher table part.
    agent.publish_kernel_view(KernelView(at=1.5, table_at=1.5, conntrack=7))
    k = answer(agent, "status")["result"]["kernel"]
    assert k["conntrack"] == 7 and k["flowtables"] == {"ft": ["lan0", "tap1"]}


class LinkSub:
    """A subsystem with a link cache (the invalidation engine's), recording drains."""

    name = "links"
    epoch = 0
    woke_at = 0.0

    def __init__(self) -> None:
        self.drained = 0

    def fds(self) -> list[int]:
        return []

    def on_readable(self) -> None:
        self.drained += 1

    def tick(self) -> None: ...

    def reconfigure(self, cfg: Config) -> None: ...

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None: ...

    def links(self) -> dict[int, Link]:
        return {7: Link(7, "cached")}


def test_replan_uses_link_cache_first_and_the_kernel_on_retry(
    tmp_path: Path, logbuf: io.StringIO
) -> None:
    agent, applier, _ = make_agent(tmp_path, logbuf)
    sub = LinkSub()
    agent.subsystems = (sub,)
    agent.start()
    seen: list[object] = []
    applier.links_hint = None

    def once_refused(cfg: Config, netns: str | None, owned: AppliedState | None) -> ApplyOutcome:
        seen.append(applier.links_hint)
        applier.links_hint = None  # consumed, as the real one
        if len(seen) == 1:
            raise EnvironmentProblem("device 'c3' vanished")
        return ApplyOutcome(True, ("+ device c4",))

    applier.apply = once_refused  # type: ignore[method-assign]
    agent.topology_changed()
    agent.reapply_if_needed()
    assert seen == [{7: Link(7, "cached")}, None]  # cache first; the retry asks the kernel
    assert sub.drained == 1  # after reading what the watcher queued meanwhile


def test_drift_check_restores_another_writers_change_and_says_so(
    tmp_path: Path, logbuf: io.StringIO
) -> None:
    """apply --force by someone else: the next drift check commits the running
    config again, logs a warning with the change count, counts a repair; an
    unchanged kernel costs nothing in the log."""
    agent, applier, _ = make_agent(tmp_path, logbuf, drift_interval=0.5)
    agent.start()
    assert agent.snapshot().drift_check_seconds == 0.5
    started = len(log_lines(logbuf))
    agent.check_drift()
    assert len(log_lines(logbuf)) == started and agent.snapshot().drift_repairs == 0  # quiet
    applier.kernel = None  # another writer changed the table
    agent.check_drift()
    drift = [line for line in log_lines(logbuf) if line["event"] == "drift"]
    assert drift[0]["level"] == "warning" and drift[0]["changes"] == 1, drift
    assert drift[0]["msg"] == "restored the table another writer changed"
    assert agent.snapshot().drift_repairs == 1
    # A failing check is logged once, not every period.
    applier.refuse = KernelError("nft transaction", "busy", 16)
    agent.check_drift()
    agent.check_drift()
    errors = [line for line in log_lines(logbuf) if line["level"] == "error"]
    assert len(errors) == 1 and errors[0]["event"] == "drift", errors


def test_the_cli_default_drift_interval_is_the_daemons() -> None:
    from controlplane.cli.agent_cmd import PARAMS

    default = next(p.default for p in PARAMS if p.dest == "drift_interval")
    assert default == daemon.DRIFT_CHECK


def test_a_group_whose_removal_failed_stays_in_the_state(
    tmp_path: Path, logbuf: io.StringIO
) -> None:
    """The applier could not remove a group we own (no bpffs, permission denied):
    the saved state keeps it (retried on the next apply) and the log says why."""
    agent, applier, _ = make_agent(tmp_path, logbuf)
    agent.start()
    problem = "reuseport group old not removed, kept as ours: no bpffs mounted at /sys/fs/bpf"

    def keeps(cfg: Config, netns: str | None, owned: AppliedState | None) -> ApplyOutcome:
        return ApplyOutcome(
            True, ("~ x",), kept_groups=("old",), kept_bpffs="/old/bpf", problems=(problem,)
        )

    applier.apply = keeps  # type: ignore[method-assign]
    assert agent.reload("sighup").ok
    saved = state_mod.load(tmp_path / "state.json")
    assert saved is not None and saved.reuseport_groups == ("old",)
    assert saved.reuseport_bpffs == "/old/bpf"  # looked for where it is pinned next time
    errors = [line for line in log_lines(logbuf) if line["level"] == "error"]
    assert [e["msg"] for e in errors] == [problem]


class ClosingSub(LinkSub):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def close(self) -> None:
        raise self.error


def test_stop_reports_a_subsystem_that_fails_to_close_but_not_a_bug(
    tmp_path: Path, logbuf: io.StringIO
) -> None:
    agent, _, _ = make_agent(tmp_path, logbuf)
    agent.subsystems = (ClosingSub(OSError(9, "Bad file descriptor")),)
    agent.start()
    agent.stop()
    assert any("Bad file descriptor" in d["msg"] for d in log_lines(logbuf) if d["event"] == "stop")
    agent.subsystems = (ClosingSub(ZeroDivisionError("oops")),)
    with pytest.raises(ZeroDivisionError):  # our bug: exit 70 through the CLI, not swallowed
        agent.stop()


def test_a_failed_cleanup_keeps_the_state(tmp_path: Path, logbuf: io.StringIO) -> None:
    agent, applier, _ = make_agent(tmp_path, logbuf, cleanup_on_exit=True)
    agent.start()

    def fails(cfg: Config, netns: str | None, owned: AppliedState | None) -> list[str]:
        raise EnvironmentProblem("reuseport group web left in place: permission denied")

    applier.cleanup = fails  # type: ignore[method-assign]
    agent.stop()
    assert (tmp_path / "state.json").exists()
    assert any("left in place" in d["msg"] for d in log_lines(logbuf) if d["level"] == "error")
