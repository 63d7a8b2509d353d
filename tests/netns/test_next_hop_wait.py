"""A route that moves to a next hop not resolved yet (issue 20), through the real service:
the flow waits for the new next hop's neighbour entry, then is torn down; or, if nothing
resolves it, is torn down when the service's wait is over. Host netns, real rtnetlink and
conntrack; the host has no flowtables, so the test-only switch takes every entry as
offloaded (``only_offloaded=False``). The VM shows why the wait matters
(``vm-tests/suite/test_nexthop.py``; docs/kernel-facts.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from controlplane.config import InvalidationConfig
from controlplane.core.flowpath import CtTuple, Family, Flow
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from controlplane.service.invalidation import NEXT_HOP_WAIT, InvalidationService
from tests.netns.conftest import sh

N1_MAC, N2_MAC = "02:00:00:00:00:21", "02:00:00:00:00:22"
# B (10.0.9.99, behind next hops on br1/br2) to A (10.0.2.2, via the routed wan0): the
# direction toward B leaves through a bridge, the direct-transmit path a route change
# makes stale.
FLOW = Flow(
    CtTuple(Family.IPV4, 6, "10.0.9.99", "10.0.2.2", 40_000, 5_201),
    CtTuple(Family.IPV4, 6, "10.0.2.2", "10.0.9.99", 5_201, 40_000),
)


@pytest.fixture
def router(make_netns: Callable[[], str]) -> str:
    """br1 (port pn1, N1 10.0.21.2 resolved) and br2 (port pn2, N2 10.0.22.2 never seen);
    B's prefix routed via N1."""
    ns = make_netns()
    for dev in ("pn1", "pn2", "wan0"):
        sh("ip", "link", "add", dev, "type", "veth", "peer", "name", f"{dev}-x", netns=ns)
        sh("ip", "link", "set", f"{dev}-x", "up", netns=ns)
    for n in (1, 2):
        sh("ip", "link", "add", f"br{n}", "type", "bridge", netns=ns)
        sh("ip", "link", "set", f"pn{n}", "master", f"br{n}", "up", netns=ns)
        sh("ip", "link", "set", f"br{n}", "up", netns=ns)
        sh("ip", "addr", "add", f"10.0.2{n}.1/24", "dev", f"br{n}", netns=ns)
    sh("ip", "addr", "add", "10.0.2.1/24", "dev", "wan0", netns=ns)
    sh("ip", "link", "set", "wan0", "up", netns=ns)
    sh("ip", "neigh", "replace", "10.0.21.2", "lladdr", N1_MAC, "dev", "br1", "nud", "permanent",
       netns=ns)  # fmt: skip
    sh("bridge", "fdb", "replace", N1_MAC, "dev", "pn1", "master", "static", netns=ns)
    sh("ip", "route", "add", "10.0.9.0/24", "via", "10.0.21.2", netns=ns)
    return ns


class Running:
    def __init__(self, netns: str) -> None:
        self.records: list[dict[str, Any]] = []
        settings = InvalidationConfig(reconcile_seconds=0, prune_seconds=0)
        self.service = InvalidationService(
            netns, settings, only_offloaded=False, freeze_gc=False, report=self.records.append
        )
        self.service.start()

    def step_until(self, done: Callable[[], object], what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.records}"
            self.service.step(timeout=0.05)

    def decisions(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("decision") == kind]


@pytest.fixture
def running(router: str) -> Iterator[Running]:
    with ConntrackSocket(router) as ct:
        assert ct.create([(FLOW, 600)]) == (1, 0)
    r = Running(router)
    try:
        r.step_until(lambda: len(r.service._engine or ()) == 1, "the entry to be indexed")
        yield r
    finally:
        r.service.stop()


def move_route(router: str, running: Running) -> float:
    """Route B's prefix via N2 and step until the service waits for it; returns when."""
    moved = time.monotonic()
    sh("ip", "route", "replace", "10.0.9.0/24", "via", "10.0.22.2", netns=router)
    running.step_until(lambda: running.decisions("waiting for next hop"), "the wait")
    assert running.decisions("waiting for next hop")[0]["ip"] == "10.0.22.2"
    assert running.decisions("tore down") == []  # still on the path it cached
    return moved


def test_the_flow_is_torn_down_when_the_new_next_hop_resolves(
    router: str, running: Running
) -> None:
    move_route(router, running)
    sh("bridge", "fdb", "replace", N2_MAC, "dev", "pn2", "master", "static", netns=router)
    sh("ip", "neigh", "replace", "10.0.22.2", "lladdr", N2_MAC, "dev", "br2", "nud", "reachable",
       netns=router)  # fmt: skip
    running.step_until(lambda: running.decisions("tore down"), "the teardown")
    (torn,) = running.decisions("tore down")
    assert torn["causes"] == [f"neighbour 10.0.22.2 on br2 is {N2_MAC}: egress changed"], torn
    assert torn["deleted"] == torn["recreated"] == 1, torn


def test_a_next_hop_nothing_resolves_is_waited_for_a_bounded_time(
    router: str, running: Running
) -> None:
    moved = move_route(router, running)
    running.step_until(lambda: running.decisions("tore down"), "the teardown")
    assert time.monotonic() - moved >= NEXT_HOP_WAIT  # it did wait
    (torn,) = running.decisions("tore down")
    assert torn["causes"] == ["next hop 10.0.22.2 on br2 still unresolved: neighbour gone"], torn
    assert torn["deleted"] == torn["recreated"] == 1, torn
