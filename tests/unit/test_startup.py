"""core/startup.py (which topology events are acted on during the start-up dump) and the
service loop that carries them (service/startup.py), with fakes for the dump and events."""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import given
from hypothesis import strategies as st

from controlplane.core import events as ev
from controlplane.core.flowpath import CtTuple, Family, Flow, Link, Topology
from controlplane.core.startup import StartupGate, addresses_of
from controlplane.service.startup import STARTUP_STEP_ENTRIES, index_while_watching

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
NEIGHBOURS = {(2, "10.0.1.2"): MAC_A, (5, "10.0.1.2"): MAC_A, (2, "10.0.1.9"): MAC_B}
# The engine's caches: A behind port 3, B behind port 5.
CACHES = Topology(
    links={4: Link(ifindex=4, name="p4", master=2)},
    neighbours=NEIGHBOURS,
    fdb={(2, 0, MAC_A): 3, (2, 0, MAC_B): 5},
)


def fdb(mac: str, port: int = 4) -> ev.FdbEntryChanged:
    return ev.FdbEntryChanged(bridge=2, vlan=0, mac=mac, port=port)


def test_fdb_move_names_the_addresses_with_that_mac() -> None:
    assert addresses_of(fdb(MAC_A), CACHES, ()) == ("10.0.1.2",)
    removed = ev.FdbEntryRemoved(bridge=2, vlan=0, mac=MAC_B)
    assert addresses_of(removed, CACHES, ()) == ("10.0.1.9",)
    assert addresses_of(fdb("02:00:00:00:00:0c"), CACHES, ()) == ()


def test_repeats_change_nothing_and_need_no_look_up() -> None:
    # The kernel re-announces entries (the engine drops repeats): nothing to look up.
    assert addresses_of(fdb(MAC_A, 3), CACHES, ()) == ()
    assert addresses_of(ev.NeighbourChanged(ifindex=2, ip="10.0.1.9", mac=MAC_B), CACHES, ()) == ()
    assert addresses_of(ev.NeighbourRemoved(ifindex=2, ip="10.0.1.7"), CACHES, ()) == ()
    assert (
        addresses_of(ev.FdbEntryRemoved(bridge=2, vlan=0, mac="02:00:00:00:00:0c"), CACHES, ())
        == ()
    )
    assert addresses_of(ev.LinkChanged(link=CACHES.links[4]), CACHES, ()) == ()


def test_neighbour_change_names_its_address() -> None:
    event = ev.NeighbourChanged(ifindex=2, ip="10.0.1.7", mac=MAC_B)
    assert addresses_of(event, CACHES, ()) == ("10.0.1.7",)
    gone = ev.NeighbourRemoved(ifindex=2, ip="10.0.1.9")
    assert addresses_of(gone, CACHES, ()) == ("10.0.1.9",)


def test_next_hops_and_other_events_are_not_narrowed() -> None:
    # The flows behind a gateway are keyed by their destinations: not named by the event.
    assert addresses_of(fdb(MAC_A), CACHES, {"10.0.1.2"}) is None
    gone = ev.NeighbourRemoved(ifindex=2, ip="10.0.1.9")
    assert addresses_of(gone, CACHES, {"10.0.1.9"}) is None
    assert addresses_of(ev.LinkRemoved(ifindex=4), CACHES, ()) is None
    changed = Link(ifindex=4, name="p4", master=None)
    assert addresses_of(ev.LinkChanged(link=changed), CACHES, ()) is None
    assert addresses_of(ev.RouteChanged(prefix="10.0.0.0/8"), CACHES, ()) is None
    assert addresses_of(ev.EventsLost(source="rtnl"), CACHES, ()) is None


def test_a_named_address_without_entries_is_held() -> None:
    """A gateway's own address has no entry: its flows are keyed by other addresses."""
    gate = StartupGate()
    move, other = fdb(MAC_A), fdb(MAC_B, 6)
    assert gate.admit(move, CACHES, ()) == ("10.0.1.2",)
    assert not gate.looked_up(move, ("10.0.1.2",), 0)
    assert gate.holding and gate.admit(other, CACHES, ()) is None
    assert gate.finish() == [move, other]
    assert gate.looked_up(other, ("10.0.1.9",), 3) and gate.looked_up(other, (), 0)


EVENTS = st.sampled_from(
    [
        fdb(MAC_A),
        fdb(MAC_B, 6),
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
    acted = [e for e in events if gate.admit(e, CACHES, ()) is not None]
    held = gate.finish()
    assert acted + held == events
    cut = next((i for i, e in enumerate(events) if addresses_of(e, CACHES, ()) is None), None)
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
        return 10

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
        return 11

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
        wait=lambda fds, timeout: fds,
        see=lambda f: log.append(("see", f.orig.src)),
        act_on=lambda e: log.append(("act", e)),
        look_up=look_up,
        caches=lambda: CACHES,
        next_hops=set,
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
    log, held, left = run(dumped, {1: [link, move], 2: [fdb(MAC_B, 6)]})
    assert held == [link, move]
    assert left == [fdb(MAC_B, 6)]  # not read while holding: still in the socket
    assert not any(x[0] in ("act", "look_up") for x in log)
