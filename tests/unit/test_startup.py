"""core/startup.py (which topology events are acted on during the start-up dump) and the
service loop that carries them (service/startup.py), with fakes for the dump and events."""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import given
from hypothesis import strategies as st

from controlplane.core import events as ev
from controlplane.core.flowpath import CtTuple, Family, Flow
from controlplane.core.startup import StartupGate, addresses_of
from controlplane.service.startup import STARTUP_STEP_ENTRIES, index_while_watching

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
NEIGHBOURS = {(2, "10.0.1.2"): MAC_A, (5, "10.0.1.2"): MAC_A, (2, "10.0.1.9"): MAC_B}


def fdb(mac: str, port: int = 4) -> ev.FdbEntryChanged:
    return ev.FdbEntryChanged(bridge=2, vlan=0, mac=mac, port=port)


def test_fdb_move_names_the_addresses_with_that_mac() -> None:
    assert addresses_of(fdb(MAC_A), NEIGHBOURS, ()) == ("10.0.1.2",)
    removed = ev.FdbEntryRemoved(bridge=2, vlan=0, mac=MAC_B)
    assert addresses_of(removed, NEIGHBOURS, ()) == ("10.0.1.9",)
    assert addresses_of(fdb("02:00:00:00:00:0c"), NEIGHBOURS, ()) == ()


def test_neighbour_change_names_its_address() -> None:
    event = ev.NeighbourChanged(ifindex=2, ip="10.0.1.7", mac=MAC_B)
    assert addresses_of(event, NEIGHBOURS, ()) == ("10.0.1.7",)
    assert addresses_of(ev.NeighbourRemoved(ifindex=2, ip="10.0.1.7"), {}, ()) == ("10.0.1.7",)


def test_next_hops_and_other_events_are_not_narrowed() -> None:
    # The flows behind a gateway are keyed by their destinations: not named by the event.
    assert addresses_of(fdb(MAC_A), NEIGHBOURS, {"10.0.1.2"}) is None
    assert addresses_of(ev.NeighbourRemoved(ifindex=2, ip="10.0.1.9"), {}, {"10.0.1.9"}) is None
    assert addresses_of(ev.LinkRemoved(ifindex=4), NEIGHBOURS, ()) is None
    assert addresses_of(ev.RouteChanged(prefix="10.0.0.0/8"), NEIGHBOURS, ()) is None
    assert addresses_of(ev.EventsLost(source="rtnl"), NEIGHBOURS, ()) is None


EVENTS = st.sampled_from(
    [
        fdb(MAC_A),
        fdb(MAC_B, 5),
        ev.NeighbourChanged(ifindex=2, ip="10.0.1.7", mac=MAC_B),
        ev.LinkRemoved(ifindex=4),
        ev.RouteChanged(prefix="10.0.0.0/8"),
        ev.EventsLost(source="rtnl"),
    ]
)


@given(st.lists(EVENTS, max_size=12))
def test_gate_acts_on_a_prefix_and_keeps_the_rest_in_order(events: list[ev.Event]) -> None:
    """Every event is acted on or handed back exactly once, in arrival order: the acted-on
    ones are exactly the narrowable prefix (nothing overtakes a held event)."""
    gate = StartupGate()
    acted = [e for e in events if gate.admit(e, NEIGHBOURS, ()) is not None]
    held = gate.finish()
    assert acted + held == events
    cut = next((i for i, e in enumerate(events) if addresses_of(e, NEIGHBOURS, ()) is None), None)
    assert acted == events[:cut] if cut is not None else acted == events
    assert not gate.holding and gate.finish() == []


def flow(src: str, sport: int) -> Flow:
    return Flow(
        CtTuple(Family.IPV4, 6, src, "192.0.2.2", sport, 80),
        CtTuple(Family.IPV4, 6, "192.0.2.2", src, 80, sport),
    )


class FakeDump:
    """A dump handed out in reads of at most ``budget`` entries; ``on_read`` runs before
    each read (to make an event arrive mid-dump)."""

    def __init__(self, flows: list[Flow], on_read: list[object]) -> None:
        self.flows, self.on_read, self.reads = flows, on_read, 0

    def fileno(self) -> int:
        return 0  # stdin: select() only waits on it (a second at most, never here)

    def begin(self) -> None:
        self.at = 0

    def read(self, budget: int) -> tuple[list[Flow], bool]:
        self.reads += 1
        out = self.flows[self.at : self.at + budget]
        self.at += len(out)
        return out, self.at >= len(self.flows)


class FakeEvents:
    def __init__(self) -> None:
        self.queued: list[ev.Event] = []

    def fileno(self) -> int:
        return 0

    def poll(self, limit: int = 65_536) -> list[ev.Event]:
        out, self.queued = self.queued[:limit], self.queued[limit:]
        return out


def run(dumped: list[Flow], arrivals: dict[int, list[ev.Event]], held_reads: bool = False):  # type: ignore[no-untyped-def]
    """Run the loop over a fake dump; events in ``arrivals[n]`` arrive before read n."""
    log: list[object] = []
    events = FakeEvents()
    dump = FakeDump(dumped, [])
    real_read = dump.read

    def read(budget: int) -> tuple[list[Flow], bool]:
        events.queued += arrivals.get(dump.reads, [])
        return real_read(budget)

    dump.read = read  # type: ignore[method-assign]
    kernel = {f.orig.src: f for f in dumped}

    def look_up(addresses: tuple[str, ...]) -> Iterable[Flow]:
        log.append(("look_up", addresses))
        return [f for a in addresses for f in [kernel[a]] if a in kernel]

    held = index_while_watching(
        dump=dump,
        events=events,
        see=lambda f: log.append(("see", f.orig.src)),
        act_on=lambda e: log.append(("act", e)),
        look_up=look_up,
        neighbours=lambda: NEIGHBOURS,
        gateways=set,
        limit=64,
    )
    # Events arriving after the last read wait in the socket for the service's loop.
    return log, held, events.queued


def test_a_move_mid_dump_is_acted_on_after_its_entries_are_indexed() -> None:
    filler = [flow(f"10.9.{i // 250}.{i % 250}", 1) for i in range(3 * STARTUP_STEP_ENTRIES)]
    victim = flow("10.0.1.2", 5)
    dumped = [*filler, victim]  # the victim comes last: not indexed when the move arrives
    log, held, left = run(dumped, {1: [fdb(MAC_A)]})
    assert held == [] and left == []
    act = log.index(("act", fdb(MAC_A)))
    # looked up, then seen (indexed), then the event: before the rest of the dump.
    assert log[act - 2 : act] == [("look_up", ("10.0.1.2",)), ("see", "10.0.1.2")]
    assert act < len(log) - 1 and sum(1 for x in log if x == ("see", "10.0.1.2")) == 2
    assert [x for x in log if x[0] == "see"][-1] == ("see", "10.0.1.2")


def test_events_that_cannot_be_narrowed_wait_with_everything_after_them() -> None:
    dumped = [flow(f"10.9.{i // 250}.{i % 250}", 1) for i in range(4 * STARTUP_STEP_ENTRIES)]
    link, move = ev.LinkRemoved(ifindex=4), fdb(MAC_A)
    log, held, left = run(dumped, {1: [link, move], 2: [fdb(MAC_B, 5)]})
    assert held == [link, move]
    assert left == [fdb(MAC_B, 5)]  # not read while holding: still in the socket
    assert not any(x[0] in ("act", "look_up") for x in log)
