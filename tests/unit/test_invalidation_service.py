"""The invalidation service as a pump over fake ports (tests/unit/fake_invalidation.py):
what it indexes, what it tears down and in which order, resyncs, reconcile, prune,
waits, notices and its life cycle, without root. The same service runs over the
real ports in tests/netns (test_flowprune, test_next_hop_wait, test_unannounced_offload)."""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import Any

import pytest

from controlplane.config import InvalidationConfig
from controlplane.core import events as ev
from controlplane.core.flowpath import CtTuple, Flow, Link, Route
from controlplane.core.schedule import NEXT_HOP_WAIT
from controlplane.errors import KernelError
from controlplane.service.invalidation import InvalidationService
from tests.unit.fake_invalidation import FakeConntrack, FakeDump, FakeKernel
from tests.unit.test_invalidation import BR0, MACS, P1, P2, base_world, route_event, tcp_flow

CLIENT, OTHER, SERVER = "10.0.0.2", "10.0.0.3", "198.51.100.7"
MOVE_AWAY = ev.FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P2)
MOVE_BACK = ev.FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P1)
NEW_HOP = Route(oif=BR0, gateway="10.0.0.9")  # a next hop the router never talked to


class Run:
    def __init__(self, *, dry_run: bool = False, **settings: Any) -> None:
        self.kernel = FakeKernel(base_world())
        self.records: list[dict[str, Any]] = []
        self.notices: list[ev.TopologyChanged] = []
        self.service = InvalidationService(
            None,
            InvalidationConfig(**({"reconcile_seconds": 0, "prune_seconds": 0} | settings)),
            dry_run=dry_run,
            report=self.records.append,
            clock=self.kernel.clock,
            freeze_gc=False,
            ports=self.kernel.ports,
            on_topology=self.notices.append,
        )

    def flow(self, src: str, sport: int, *, offloaded: bool = True) -> Flow:
        flow = tcp_flow(src, SERVER, sport, masq=True)
        return self.kernel.add(flow if offloaded else replace(flow, status=0x10), silent=True)

    def decisions(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("decision") == name]

    @property
    def conntrack(self) -> FakeConntrack:
        ct = self.kernel.last.conntrack
        assert isinstance(ct, FakeConntrack)
        return ct


def test_start_indexes_every_tcp_and_udp_entry_as_possibly_offloaded() -> None:
    run = Run()
    run.flow(CLIENT, 40001)
    run.flow(CLIENT, 40002, offloaded=False)  # may be offloaded without an event
    icmp = Flow(
        orig=CtTuple(2, 1, CLIENT, SERVER, 0, 0, icmp_id=7, icmp_type=8, icmp_code=0),
        reply=CtTuple(2, 1, SERVER, CLIENT, 0, 0, icmp_id=7, icmp_type=0, icmp_code=0),
        id=9,
        zone=0,
        mark=0,
        status=0,
    )
    run.kernel.add(icmp, silent=True)
    run.service.start()
    assert len(run.service.engine) == 2
    assert {"event": "FlowsDumped", "flows": 2} in run.records


def test_a_move_tears_down_only_what_the_kernel_says_is_offloaded() -> None:
    run = Run()
    live = run.flow(CLIENT, 40001)
    idle = run.flow(CLIENT, 40002, offloaded=False)
    other = run.flow(OTHER, 40003)
    run.service.start()
    run.kernel.change(MOVE_AWAY)
    run.service.step()
    back = run.kernel.entry(live)
    assert back is not None and not back.offloaded  # deleted, re-created on the classic path
    assert run.kernel.entry(idle) == idle  # on the classic path: left alone
    assert run.kernel.entry(other) == other
    [torn] = run.decisions("tore down")
    assert (torn["flows"], torn["deleted"], torn["recreated"], torn["not_offloaded"]) == (
        1,
        1,
        1,
        1,
    )
    st = run.service.stats
    assert (st.flows_torn_down, st.recreated, st.not_offloaded) == (1, 1, 1)
    assert len(run.service.engine) == 2  # the idle entry and `other` stay indexed


def test_entries_found_idle_are_checked_after_the_live_ones() -> None:
    run = Run()
    live = run.flow(CLIENT, 40001)
    idle = run.flow(CLIENT, 40002, offloaded=False)
    run.service.start()
    run.kernel.change(MOVE_AWAY)
    run.service.step()
    run.service.step()  # the echo of our own teardown: DESTROY + NEW of the re-created entry
    recreated = run.kernel.entry(live)
    assert recreated is not None
    run.kernel.offload(recreated)  # re-offloaded by its next packet, silently
    run.kernel.change(MOVE_BACK)
    run.service.step()
    asked = run.conntrack.asked[-2:]
    assert [[f.orig for f in batch] for batch in asked] == [[live.orig], [idle.orig]]
    assert run.decisions("tore down")[-1]["flows"] == 1


def test_dry_run_decides_and_deletes_nothing() -> None:
    run = Run(dry_run=True)
    live = run.flow(CLIENT, 40001)
    run.service.start()
    run.kernel.change(MOVE_AWAY)
    run.service.step()
    assert run.kernel.entry(live) == live
    assert [r["flows"] for r in run.decisions("would tear down")] == [1]


def test_lost_rtnl_events_are_found_by_a_fresh_snapshot() -> None:
    run = Run()
    live = run.flow(CLIENT, 40001)
    run.service.start()
    run.kernel.capacity = 1
    run.kernel.change(ev.NeighbourChanged(ifindex=BR0, ip="10.0.0.9", mac=MACS[5]))
    run.kernel.change(MOVE_AWAY)  # overflows: never delivered
    run.service.step()
    st = run.service.stats
    assert (st.events_lost, st.resyncs) == (1, 1)
    entry = run.kernel.entry(live)
    assert entry is not None and not entry.offloaded  # the missed move was repaired


def test_lost_conntrack_events_are_found_by_a_redump() -> None:
    run = Run()
    run.service.start()
    run.kernel.capacity = 1
    run.kernel.add(tcp_flow(CLIENT, SERVER, 40001, masq=True))
    run.kernel.add(tcp_flow(OTHER, SERVER, 40002, masq=True))  # dropped: the queue is full
    run.service.step()
    assert run.service.stats.resyncs == 1 and len(run.service.engine) == 2


def test_the_reconcile_finds_a_move_the_kernel_never_announced() -> None:
    run = Run(reconcile_seconds=30)
    live = run.flow(CLIENT, 40001)
    run.service.start()
    run.kernel.change(MOVE_AWAY, silent=True)
    run.service.step(timeout=5)
    assert run.kernel.entry(live) == live and run.service.stats.reconciles == 0
    run.service.step(timeout=60)  # blocks until the reconcile is due, not 60 s
    assert run.kernel.clock.now == 1030.0
    assert run.service.stats.reconciles == 1
    entry = run.kernel.entry(live)
    assert entry is not None and not entry.offloaded


def test_a_prune_drops_entries_that_ended_without_an_event() -> None:
    run = Run(prune_seconds=60)
    ended = run.flow(CLIENT, 40001)
    run.flow(OTHER, 40002)
    run.service.start()
    run.kernel.end(ended, silent=True)
    for _ in range(10):
        run.service.step(timeout=120)
        if run.service.stats.prunes:
            break
    assert run.service.stats.pruned == 1 and len(run.service.engine) == 1
    [pruned] = run.decisions("pruned")
    assert pruned["gone"] == 1 and pruned["indexed"] == 1
    assert run.service.next_deadline() == pytest.approx(run.kernel.clock.now + 60)


def test_a_failed_prune_dump_loses_only_the_round() -> None:
    run = Run(prune_seconds=60)
    ended = run.flow(CLIENT, 40001)
    run.service.start()
    run.kernel.end(ended, silent=True)
    dump = run.kernel.last.dump
    assert isinstance(dump, FakeDump)
    dump.fail = errno.EIO
    for _ in range(5):
        run.service.step(timeout=120)
        if run.service.stats.errors:
            break
    assert run.decisions("prune failed") and run.service.stats.pruned == 0
    assert len(run.service.engine) == 1  # as good as before the round
    assert run.service.next_deadline() < float("inf")  # tried again next period


def test_link_changes_are_noticed_with_the_links_as_they_are_now() -> None:
    run = Run()
    run.service.start()
    assert len(run.notices) == 1 and run.notices[0].links[P1].master == BR0  # the snapshot
    run.kernel.change(ev.FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[5], port=P2))
    run.service.step()
    assert len(run.notices) == 1  # an FDB event changes no link
    run.kernel.link(Link(P1, "p1", "veth", master=None))  # left the bridge
    run.service.step()
    assert len(run.notices) == 2 and run.notices[1].links[P1].master is None


def test_a_stopped_service_fails_like_a_closed_socket() -> None:
    run = Run()
    run.service.start()
    assert len(run.kernel.sockets) == 6
    run.service.stop()
    assert run.kernel.sockets == {}  # every port closed
    with pytest.raises(KernelError) as raised:
        run.service.step()
    assert raised.value.errno == errno.EBADF
    run.service.wake()  # a late signal handler: harmless


def test_a_lost_socket_surfaces_to_the_caller() -> None:
    run = Run()
    run.service.start()
    run.kernel.fail_poll = errno.ENETDOWN
    run.kernel.change(MOVE_AWAY)
    with pytest.raises(KernelError):
        run.service.step()


def test_a_start_that_fails_closes_what_it_opened() -> None:
    run = Run()
    run.kernel.fail_poll = None

    def broken_dump(on_flow: Any) -> None:
        raise KernelError("conntrack dump", "Operation not permitted", errno.EPERM)

    def ports(netns: str | None, settings: InvalidationConfig) -> Any:
        opened = run.kernel.ports(netns, settings)
        opened.changes.dump_each = broken_dump  # type: ignore[method-assign]
        return opened

    run.service = InvalidationService(None, InvalidationConfig(), ports=ports, freeze_gc=False)
    with pytest.raises(KernelError):
        run.service.start()
    assert run.kernel.sockets == {}


def test_a_flow_waits_for_its_new_next_hop_then_is_torn_down_anyway() -> None:
    run = Run()
    live = run.flow(CLIENT, 40001)
    run.service.start()
    # The route back to the client moves to a next hop the router never talked to.
    run.kernel.change(
        route_event(run.kernel.world, "10.0.0.0/24", Route(oif=BR0, gateway="10.0.0.9"))
    )
    run.service.step()
    [wait] = run.decisions("waiting for next hop")
    assert wait["ip"] == "10.0.0.9" and wait["dev"] == "br0"
    assert run.kernel.entry(live) == live  # keeps its cached path meanwhile
    started = run.kernel.clock.now
    run.service.step(timeout=60)  # sleeps until the wait is over, not 60 s
    assert run.kernel.clock.now == started + NEXT_HOP_WAIT
    entry = run.kernel.entry(live)
    assert entry is not None and not entry.offloaded  # torn down once the wait was over
    assert run.service.next_deadline() == float("inf")


def test_a_next_hop_that_resolves_ends_the_wait_at_once() -> None:
    run = Run()
    live = run.flow(CLIENT, 40001)
    run.service.start()
    run.kernel.change(
        route_event(run.kernel.world, "10.0.0.0/24", Route(oif=BR0, gateway="10.0.0.9"))
    )
    run.service.step()
    run.kernel.change(ev.NeighbourChanged(ifindex=BR0, ip="10.0.0.9", mac=MACS[5]))
    run.service.step()
    entry = run.kernel.entry(live)
    assert entry is not None and not entry.offloaded
    assert run.kernel.clock.now == 1000.0  # no waiting
