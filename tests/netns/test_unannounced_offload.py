"""Offloads the kernel never announces (issue 8): the watcher indexes UDP entries whatever
their status and asks the kernel before tearing one down. Host netns, real conntrack +
bridge; the host has no flowtables, so no entry here is ever offloaded: the assertion that
a silently offloaded flow IS torn down needs the VM (``vm-tests/suite/test_invalidation.py``,
UDP ``beats-first``: the entry is ``[UNREPLIED] [OFFLOAD]`` and no event ever says so).

The kernel sets IPS_OFFLOAD without a conntrack event when the packet that offloads an
entry changes nothing else in it (a UDP flow's second packet before any reply, a flow under
``min_packets``, an entry the watcher re-created). Here: an entry whose NEW event carries
no OFFLOAD bit, and a move of its host between two bridge ports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from controlplane.config import InvalidationConfig
from controlplane.core import events as ev
from controlplane.core.flowpath import CtTuple, Family, Flow
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from controlplane.service.invalidation import InvalidationService
from controlplane.testing import Bridge, NetLab, Netns, Topology, Veth
from tests.netns.conftest import sh

A_MAC = "02:00:00:00:00:0a"
# A (10.0.1.2, behind br0) sends UDP to B (10.0.2.2, via wan0): B's replies leave
# through br0 toward A's MAC, the bridged (direct transmit) direction a move makes stale.
FLOW = Flow(
    CtTuple(Family.IPV4, 17, "10.0.1.2", "10.0.2.2", 40_000, 5_000),
    CtTuple(Family.IPV4, 17, "10.0.2.2", "10.0.1.2", 5_000, 40_000),
)


ROUTER = Topology(
    namespaces={
        "r": Netns(
            bridges=[Bridge("br0", ports=["pa", "pb"])],
            addresses={"br0": "10.0.1.1/24", "wan0": "10.0.2.1/24"},
        )
    },
    links=[Veth(f"r:{dev}", f"r:{dev}-x") for dev in ("pa", "pb", "wan0")],
)


@pytest.fixture
def router(netlab: NetLab) -> str:
    """br0 (10.0.1.1/24) with ports pa, pb; wan0 (10.0.2.1/24); A's neighbour and FDB
    entries on pa."""
    ns = netlab.build(ROUTER).ns("r")
    sh("ip", "neigh", "replace", "10.0.1.2", "lladdr", A_MAC, "dev", "br0", "nud", "permanent",
       netns=ns)  # fmt: skip
    sh("bridge", "fdb", "replace", A_MAC, "dev", "pa", "master", "static", netns=ns)
    return ns


class Running:
    def __init__(self, netns: str, *, only_offloaded: bool) -> None:
        self.records: list[dict[str, Any]] = []
        settings = InvalidationConfig(reconcile_seconds=0, prune_seconds=0)
        self.service = InvalidationService(
            netns, settings, only_offloaded=only_offloaded, freeze_gc=False,
            report=self.records.append,
        )  # fmt: skip
        self.service.start()

    def indexed(self) -> list[Flow]:
        engine = self.service._engine
        assert engine is not None
        return [f for f, _, _ in engine.flows()]  # type: ignore[attr-defined]

    def step_until(self, done: Callable[[], object], what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.records}"
            self.service.step(timeout=0.05)

    def decisions(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "decision" in r]


@pytest.fixture(params=[True, False], ids=["production", "testing-switch"])
def running(router: str, request: pytest.FixtureRequest) -> Iterator[Running]:
    r = Running(router, only_offloaded=request.param)
    try:
        yield r
    finally:
        r.service.stop()


def kernel_status(netns: str) -> int | None:
    with ConntrackSocket(netns) as ct:
        return ct.statuses([FLOW])[0][1]


def seconds_left(netns: str) -> int:
    """The entry's remaining timeout (``conntrack -L``): created with 600 s here; a
    re-created one gets the namespace's UDP stream timeout (120 s). Ids prove nothing:
    a re-created entry can get its old id back."""
    out = sh("conntrack", "-L", "-p", "udp", "--orig-port-src", "40000", netns=netns)
    return int(out.split()[2])


# The same flow as TCP: an established entry a policy's ``min_packets`` offloads later.
TCP_FLOW = Flow(replace(FLOW.orig, proto=6), replace(FLOW.reply, proto=6))


@pytest.mark.parametrize("flow", [FLOW, TCP_FLOW], ids=["udp", "tcp"])
def test_an_entry_whose_offload_was_not_announced_is_indexed(
    router: str, running: Running, flow: Flow
) -> None:
    with ConntrackSocket(router) as ct:
        assert ct.create([(flow, 600)]) == (1, 0)  # its NEW event: no IPS_OFFLOAD
    running.step_until(
        lambda: any(f.orig == flow.orig for f in running.indexed()), "the entry to be indexed"
    )


def test_a_conntrack_resync_keeps_entries_whose_offload_was_not_announced(
    router: str, running: Running
) -> None:
    with ConntrackSocket(router) as ct:
        assert ct.create([(FLOW, 600), (TCP_FLOW, 600)]) == (2, 0)
    running.step_until(lambda: len(running.indexed()) == 2, "both entries to be indexed")
    running.service._handle(ev.EventsLost(source="conntrack"))  # as after ENOBUFS
    running.step_until(
        lambda: any(r.get("event") == "FlowsDumped" for r in running.records[1:]), "the re-dump"
    )
    assert sorted(f.orig.proto for f in running.indexed()) == [6, 17]


def test_a_move_tears_down_only_what_the_kernel_says_is_offloaded(
    router: str, running: Running
) -> None:
    """Production: the kernel says the entry is not offloaded (no flowtables here): left
    alone, same id, still indexed (the kernel may offload it later, silently). The
    test-only switch takes every entry as offloaded: the same move tears it down."""
    with ConntrackSocket(router) as ct:
        assert ct.create([(FLOW, 600)]) == (1, 0)
    before = kernel_status(router)
    assert before is not None
    running.step_until(lambda: running.indexed(), "the entry to be indexed")
    sh("bridge", "fdb", "replace", A_MAC, "dev", "pb", "master", "static", netns=router)
    running.step_until(running.decisions, "a decision on the move")
    running.step_until(
        lambda: [r for r in running.decisions() if r["decision"] != "stale"], "the teardown step"
    )
    stale = [r for r in running.decisions() if r["decision"] == "stale"]
    assert stale and "moved pa -> pb" in stale[0]["cause"], running.records
    after = kernel_status(router)
    if running.service.only_offloaded:
        assert running.service.stats.not_offloaded == 1
        assert not [r for r in running.decisions() if r["decision"] == "tore down"]
        assert [r for r in running.decisions() if r["decision"].startswith("left alone")]
        assert after is not None and seconds_left(router) > 300  # not deleted nor re-created
        assert [f.orig for f in running.indexed()] == [FLOW.orig]  # still watched
    else:
        torn = [r for r in running.decisions() if r["decision"] == "tore down"]
        assert torn and torn[0]["deleted"] == 1, running.records
        assert after is not None and seconds_left(router) <= 120  # deleted and re-created
