"""The flow-index prune against the real kernel (host netns; nothing here needs flowtables:
every TCP/UDP entry is indexed as if offloaded, the test-only switch).

With ``nf_conntrack_events=2`` (the default) an entry created while no process on the
machine listened to conntrack events carries no event extension: it never reports
DESTROY. The tests make the entries that predate the service such entries whatever
else runs on the machine (``create_without_events``); deleting them afterwards is
silent, and only the periodic re-dump (``invalidation.prune_seconds``) takes them out
of the index.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from controlplane.config import InvalidationConfig
from controlplane.core.flowpath import CtTuple, Family, Flow
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from controlplane.kernel.ctnetlink.events import CtEvents
from controlplane.service.invalidation import InvalidationService
from tests.netns.conftest import create_without_events, sh

OLD = 40  # entries created before the service: no DESTROY will ever come
TIMEOUT = 3600


def tcp(i: int, src: str = "10.0.0.1") -> Flow:
    return Flow(
        CtTuple(Family.IPV4, 6, src, "10.0.0.2", 20_000 + i, 80),
        CtTuple(Family.IPV4, 6, "10.0.0.2", src, 80, 20_000 + i),
    )


def indexed(service: InvalidationService) -> dict[tuple[str, int], int]:
    engine = service._engine
    assert engine is not None
    return {(f.orig.src, f.orig.sport): f.id for f, _, _ in engine.flows()}  # type: ignore[attr-defined]


def kernel(netns: str) -> dict[tuple[str, int], int]:
    with ConntrackSocket(netns) as ct:
        return {(f.orig.src, f.orig.sport): f.id for f in ct.dump() if f.orig.proto == 6}


def step_until(service: InvalidationService, done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        service.step(timeout=0.05)


def settle(service: InvalidationService) -> None:
    """Handle every queued event (a delete's DESTROY is queued before the delete returns)."""
    deadline = time.monotonic() + 10
    while service.step(timeout=0.2) and time.monotonic() < deadline:
        pass


def start(netns: str, prune_seconds: float, more: int = 0) -> InvalidationService:
    assert create_without_events(netns, ((tcp(i), TIMEOUT) for i in range(OLD))) == OLD
    settings = InvalidationConfig(reconcile_seconds=0, prune_seconds=prune_seconds)
    service = InvalidationService(netns, settings, only_offloaded=False, freeze_gc=False)
    service.start()
    assert len(indexed(service)) == OLD + more
    return service


def end_and_recreate(netns: str) -> tuple[list[Flow], Flow]:
    """Delete half the old entries (silently) and re-create one under a new id."""
    with ConntrackSocket(netns) as ct:
        now = {(f.orig.src, f.orig.sport): f for f in ct.dump()}
        dead = [now[("10.0.0.1", 20_000 + i)] for i in range(0, OLD, 2)]
        assert ct.delete(dead).deleted == len(dead)
        reborn = now[("10.0.0.1", 20_001)]
        assert ct.delete([reborn]).deleted == 1
        assert ct.create([(tcp(1), TIMEOUT)]) == (1, 0)
    return dead, reborn


def test_a_listener_in_another_namespace_gives_entries_their_end_event(
    make_netns: Callable[[], str],
) -> None:
    # What the tests here rely on, as the kernel shows it: with the default
    # nf_conntrack_events=2, whether an entry will report DESTROY is decided when it is
    # made, by whether any process on the machine listens (someone else's agent or
    # watch will do); with 0 while it is made, it never will.
    here, elsewhere = make_netns(), make_netns()
    sh("sysctl", "-qw", "net.netfilter.nf_conntrack_events=2", netns=here)
    with CtEvents(elsewhere):
        with ConntrackSocket(here) as ct:
            assert ct.create([(tcp(0), TIMEOUT)]) == (1, 0)
        assert create_without_events(here, [(tcp(1), TIMEOUT)]) == 1
    with CtEvents(here) as events:
        with ConntrackSocket(here) as ct:
            assert ct.delete(f for f in ct.dump() if f.orig.proto == 6).deleted == 2
        changes, lost = events.poll()  # a delete queues its DESTROY before it returns
    assert not lost
    assert {c.flow.orig.sport for c in changes if c.gone} == {20_000}


def test_without_the_prune_entries_older_than_the_service_stay_indexed(
    make_netns: Callable[[], str],
) -> None:
    # The limitation the prune exists for, as the kernel shows it.
    netns = make_netns()
    service = start(netns, prune_seconds=0)
    try:
        dead, reborn = end_and_recreate(netns)
        settle(service)
        held = indexed(service)
        assert all((f.orig.src, f.orig.sport) in held for f in dead)  # no DESTROY came
        # The re-created entry's NEW came and replaced the dead entry's id.
        assert held[("10.0.0.1", 20_001)] == kernel(netns)[("10.0.0.1", 20_001)] != reborn.id
        assert service.stats.prunes == 0
    finally:
        service.stop()


def test_the_prune_drops_ended_entries_and_takes_new_ids(make_netns: Callable[[], str]) -> None:
    netns = make_netns()
    service = start(netns, prune_seconds=0.2)
    try:
        dead, _ = end_and_recreate(netns)
        settle(service)
        rounds = service.stats.prunes
        step_until(service, lambda: service.stats.prunes > rounds, timeout=10)
        held = indexed(service)
        assert held == kernel(netns)  # the live entries, with their current ids
        assert not any((f.orig.src, f.orig.sport) in held for f in dead)
        assert len(held) == OLD - len(dead)
        assert service.stats.pruned >= len(dead)
    finally:
        service.stop()


def test_events_keep_flowing_while_a_prune_reads_its_dump(make_netns: Callable[[], str]) -> None:
    # Entries made and ended while the round is under way are the events' business:
    # the round neither drops a flow that began after its dump passed by nor keeps
    # one that ended.
    netns = make_netns()
    many = 3000
    with ConntrackSocket(netns) as ct:
        ct.create((tcp(i, "10.0.1.1"), TIMEOUT) for i in range(many))
    service = start(netns, prune_seconds=3600, more=many)
    try:
        service.schedule.prune_now()
        service.step(timeout=0)  # starts the round: the dump request is sent
        assert service._prune is not None
        with ConntrackSocket(netns) as ct:
            assert ct.create((tcp(i, "10.0.2.1"), TIMEOUT) for i in range(20)) == (20, 0)
            late = {(f.orig.src, f.orig.sport): f for f in ct.dump()}
            ended = [late[("10.0.2.1", 20_000 + i)] for i in range(10)]
            assert ct.delete(ended).deleted == 10
        step_until(service, lambda: service.stats.prunes >= 1, timeout=30)
        settle(service)
        assert indexed(service) == kernel(netns)
        assert service.stats.last_prune_step < service.stats.last_prune_seconds
    finally:
        service.stop()


class HeldDump:
    """The service's real dump, read whole when the round begins and handed to the
    service only once the test releases it. The kernel dumps in hash order (random
    per namespace), so whether an entry made mid-round is in the dump is chance;
    holding the dump back makes "after the dump passed by" certain."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.flows: list[Flow] = []
        self.released = False

    def fileno(self) -> int:
        return int(self.real.fileno())

    def close(self) -> None:
        self.real.close()

    def begin(self) -> None:
        self.real.begin()
        deadline, done = time.monotonic() + 10, False
        while not done:
            assert time.monotonic() < deadline, "dump timed out"
            flows, done = self.real.read(1 << 30)
            self.flows += flows

    def read(self, budget: int) -> tuple[list[Flow], bool]:
        if not self.released:
            return [], False
        out, self.flows = self.flows[:budget], self.flows[budget:]
        return out, not self.flows


def test_entries_that_begin_or_end_after_the_dump_are_left_to_their_events(
    make_netns: Callable[[], str],
) -> None:
    netns = make_netns()
    service = start(netns, prune_seconds=3600)
    try:
        with ConntrackSocket(netns) as ct:  # made with a listener: they report their end
            assert ct.create((tcp(i, "10.0.3.1"), TIMEOUT) for i in range(20)) == (20, 0)
        settle(service)
        assert service.ports is not None
        held = HeldDump(service.ports.dump)
        service.ports.dump = held
        service.schedule.prune_now()
        service.step(timeout=0)
        assert service._prune is not None and held.flows  # the dump is taken, not yet handed
        with ConntrackSocket(netns) as ct:
            now = {(f.orig.src, f.orig.sport): f for f in ct.dump()}
            # In the dump, then ended: a DESTROY event.
            ended = [now[("10.0.3.1", 20_000 + i)] for i in range(10)]
            assert ct.delete(ended).deleted == 10
            # Not in the dump: NEW events (and DESTROY for half of them).
            assert ct.create((tcp(i, "10.0.4.1"), TIMEOUT) for i in range(20)) == (20, 0)
            late = {(f.orig.src, f.orig.sport): f for f in ct.dump()}
            assert ct.delete(late[("10.0.4.1", 20_000 + i)] for i in range(10)).deleted == 10
        settle(service)
        assert service.stats.prunes == 0
        held.released = True
        step_until(service, lambda: service.stats.prunes >= 1, timeout=30)
        assert indexed(service) == kernel(netns)
        assert sum(1 for src, _ in indexed(service) if src == "10.0.4.1") == 10
    finally:
        service.stop()
