"""The agent runs the flow-index prune: entries older than the agent, ended without a
DESTROY (made without the event extension: ``create_without_events``), leave its index,
and ``status`` counts it (host netns; every entry indexed as offloaded, the test-only
switch, since the host has no flowtables)."""

from __future__ import annotations

import os
from pathlib import Path

from controlplane.core.flowbook import TESTING_ALL_OFFLOADED
from controlplane.core.flowpath import CtTuple, Family, Flow
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from tests.netns.conftest import create_without_events
from tests.netns.test_agent import AgentProc, agents, rundir, wait_for

__all__ = ["agents", "rundir"]  # fixtures, imported for pytest

OLD = 30


def tcp(i: int) -> Flow:
    return Flow(
        CtTuple(Family.IPV4, 6, "10.0.0.1", "10.0.0.2", 20_000 + i, 80),
        CtTuple(Family.IPV4, 6, "10.0.0.2", "10.0.0.1", 80, 20_000 + i),
    )


def test_the_agent_prunes_flows_that_ended_without_a_destroy(
    netns: str, tmp_path: Path, rundir: Path, agents: list[AgentProc]
) -> None:
    assert create_without_events(netns, ((tcp(i), 3600) for i in range(OLD))) == OLD
    cfg = {"version": 1, "invalidation": {"prune_seconds": 0.5, "reconcile_seconds": 0}}
    a = AgentProc(netns, tmp_path, rundir, cfg)
    a.env = os.environ | {TESTING_ALL_OFFLOADED: "1"}
    agents.append(a)
    a.start()

    def invalidation() -> dict[str, int]:
        inv: dict[str, int] = a.call("status").result["invalidation"]
        return inv

    wait_for(lambda: invalidation()["indexed_flows"] == OLD, "the agent's start-up index")
    with ConntrackSocket(netns) as ct:
        ended = [f for f in ct.dump() if f.orig.sport % 2 == 0]
        assert ct.delete(ended).deleted == OLD // 2
    wait_for(lambda: invalidation()["indexed_flows"] == OLD - OLD // 2, "the prune", timeout=30)
    inv = invalidation()
    assert inv["prunes"] >= 1 and inv["pruned"] == OLD // 2, inv
