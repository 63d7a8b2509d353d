"""The flow-index prune (``core/flowindex.PruneRound``): after a round, the index holds
what a fresh index built from the dump holds, whatever the index held before; entries
an event spoke for during the round are left as the events left them."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core.events import FlowGone, FlowSeen
from controlplane.core.flowindex import FlowRecord, PruneRound, _Marks
from controlplane.core.flowpath import IPS_OFFLOAD, CtTuple, Flow
from controlplane.core.invalidation import Engine

IPS_ASSURED = 1 << 2
# A small pool of identities (zone + original tuple) so that index and dump overlap.
identities = st.tuples(
    st.sampled_from([0, 5]),
    st.sampled_from([6, 17]),
    st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::1"]),
    st.integers(1000, 1015),
)


def entry(ident: tuple[int, int, str, int], ct_id: int, mark: int, offloaded: bool) -> Flow:
    zone, proto, src, sport = ident
    v6 = ":" in src
    dst = "fd00::99" if v6 else "192.0.2.9"
    family = 10 if v6 else 2
    return Flow(
        orig=CtTuple(family, proto, src, dst, sport, 443),
        reply=CtTuple(family, proto, dst, src, 443, sport),
        id=ct_id,
        zone=zone,
        mark=mark,
        status=IPS_ASSURED | (IPS_OFFLOAD if offloaded else 0),
    )


@st.composite
def index_and_dump(draw: st.DrawFn, all_offloaded: bool = False) -> tuple[list[Flow], list[Flow]]:
    """Indexed flows and a dump of the same namespace, later: entries ended, began,
    were re-created under a new id, changed their mark, left the fast path."""
    idents = draw(st.lists(identities, unique=True, max_size=12))
    indexed: list[Flow] = []
    dumped: list[Flow] = []
    for ident in idents:
        in_index, in_dump = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
        ct_id, mark = draw(st.integers(1, 3)), draw(st.integers(0, 1))
        if in_index:
            indexed.append(entry(ident, ct_id, mark, True))
        if in_dump:
            if in_index and draw(st.booleans()):
                ct_id = draw(st.integers(1, 3))  # re-created under the same tuple
            if in_index and draw(st.booleans()):
                mark = draw(st.integers(0, 1))
            offloaded = all_offloaded or draw(st.booleans())
            dumped.append(entry(ident, ct_id, mark, offloaded))
    return indexed, draw(st.permutations(dumped))


def engine_with(flows: list[Flow]) -> Engine:
    engine = Engine()
    for flow in flows:
        engine.handle(FlowSeen(flow=flow))
    return engine


def apply(engine: Engine, decisions: tuple[list[Flow], list[Flow]]) -> None:
    gone, seen = decisions
    for flow in gone:
        engine.handle(FlowGone(flow=flow))
    for flow in seen:
        engine.handle(FlowSeen(flow=flow))


def held(engine: Engine) -> set[tuple[object, ...]]:
    """What the index holds per entry, status aside (it changes all the time)."""
    return {(f.zone, f.orig, f.reply, f.id, f.mark) for f, _, _ in engine.flows()}


def prune(engine: Engine, dump: list[Flow], chunk: int = 3) -> PruneRound:
    round_ = PruneRound(engine.index)
    for first in range(0, len(dump), chunk):
        for flow in dump[first : first + chunk]:
            round_.dumped(flow)
        apply(engine, round_.take())
    round_.finish()
    while not round_.done:
        apply(engine, round_.take(2))
    return round_


@settings(max_examples=300)
@given(index_and_dump(all_offloaded=True))
def test_after_a_prune_the_index_is_a_fresh_index_of_the_dump(
    case: tuple[list[Flow], list[Flow]],
) -> None:
    indexed, dump = case
    engine = engine_with(indexed)
    prune(engine, dump)
    assert held(engine) == held(engine_with(dump))
    assert len(engine) == len(dump)


@settings(max_examples=300)
@given(index_and_dump())
def test_entries_off_the_fast_path_are_kept_while_they_live(
    case: tuple[list[Flow], list[Flow]],
) -> None:
    # The kernel re-offloads an entry without an event: a live indexed entry stays
    # even if the dump shows it on the classic path; a dead one never does.
    # An entry is the same while its conntrack id is (its mark may change).
    indexed, dump = case
    engine = engine_with(indexed)
    ids = {(f.zone, f.orig, f.id) for f in indexed}
    prune(engine, dump)
    fresh = held(engine_with(dump))  # the offloaded entries of the dump
    alive = {(f.zone, f.orig, f.reply, f.id, f.mark) for f in dump if (f.zone, f.orig, f.id) in ids}
    assert held(engine) == fresh | alive


@settings(max_examples=300)
@given(index_and_dump(), st.data())
def test_entries_events_spoke_for_during_the_round_are_left_to_the_events(
    case: tuple[list[Flow], list[Flow]], data: st.DataObject
) -> None:
    indexed, dump = case
    if not indexed and not dump:
        return
    engine = engine_with(indexed)
    round_ = PruneRound(engine.index)
    idents: dict[tuple[object, ...], Flow] = {(f.zone, f.orig): f for f in indexed + dump}
    touched: set[tuple[object, ...]] = set()
    left_by_events: dict[tuple[object, ...], tuple[object, ...] | None] = {}

    def maybe_an_event() -> None:
        # An event arrives mid-round: an entry begins (new id) or ends.
        event_now: bool = data.draw(st.booleans())
        if not event_now:
            return
        key = data.draw(st.sampled_from(sorted(idents, key=repr)))
        base = idents[key]
        event_flow = replace(base, id=base.id + 100, status=IPS_ASSURED | IPS_OFFLOAD)
        ends = data.draw(st.booleans())
        round_.touch(event_flow)
        engine.handle(FlowGone(flow=event_flow) if ends else FlowSeen(flow=event_flow))
        touched.add(key)
        mine = [h for h in held(engine) if (h[0], h[1]) == key]
        left_by_events[key] = mine[0] if mine else None

    for flow in dump:
        maybe_an_event()
        round_.dumped(flow)
        apply(engine, round_.take())
    round_.finish()
    while not round_.done:  # decisions handed out one per step, events between them
        maybe_an_event()
        apply(engine, round_.take(1))
    for key, state in left_by_events.items():
        mine = [h for h in held(engine) if (h[0], h[1]) == key]
        assert (mine[0] if mine else None) == state
    # Entries no event spoke for follow the dump.
    untouched = [f for f in dump if (f.zone, f.orig) not in touched]
    survivors = {h for h in held(engine) if (h[0], h[1]) not in touched}
    assert held(engine_with(untouched)) <= survivors
    dumped_keys = {(f.zone, f.orig) for f in dump}
    assert all((h[0], h[1]) in dumped_keys for h in survivors)


def test_a_round_past_its_bound_decides_nothing() -> None:
    dead = entry((0, 6, "10.0.0.1", 1000), 1, 0, True)
    engine = engine_with([dead])
    round_ = PruneRound(engine.index, touched_limit=2)
    for sport in range(1001, 1004):  # three events: one more than the bound
        round_.touch(entry((0, 6, "10.0.0.1", sport), 1, 0, True))
    round_.dumped(entry((0, 6, "10.0.0.2", 1000), 1, 0, True))
    assert round_.overflowed
    round_.finish()
    assert round_.take() == ([], [])
    assert round_.done
    assert len(engine) == 1


def test_counts_say_what_the_round_did() -> None:
    dead = entry((0, 6, "10.0.0.1", 1000), 1, 0, True)
    recreated = entry((0, 6, "10.0.0.1", 1001), 1, 0, True)
    engine = engine_with([dead, recreated])
    missed = entry((0, 17, "10.0.0.2", 1002), 7, 0, True)
    round_ = PruneRound(engine.index)
    round_.dumped(replace(recreated, id=2))
    round_.dumped(missed)
    apply(engine, round_.take())
    round_.finish()
    apply(engine, round_.take())
    assert round_.done
    assert (round_.gone, round_.added, round_.changed, round_.dumped_entries) == (1, 1, 1, 2)
    assert held(engine) == held(engine_with([replace(recreated, id=2), missed]))


def test_marks_never_drop_a_live_flow_and_dead_ones_go_within_rounds() -> None:
    # The round remembers what the dump confirmed in a ~16-bits-per-record filter
    # (memory), not a set: a dead record may survive a round by chance (p ~0.5%),
    # never a live one be dropped; the next round, salted differently, drops it.
    live = [entry((0, 6, f"10.1.{i // 250}.{i % 250}", 1000), 1, 0, True) for i in range(5000)]
    dead = [entry((0, 6, f"10.2.{i // 250}.{i % 250}", 1000), 1, 0, True) for i in range(5000)]
    engine = engine_with(live + dead)
    survivors = []
    for salt in range(4):
        round_ = PruneRound(engine.index, salt=salt)
        for flow in live:
            round_.dumped(flow)
        round_.finish()
        apply(engine, round_.take())
        assert held(engine) >= held(engine_with(live))
        survivors.append(len(engine) - len(live))
    assert survivors[0] <= len(dead) // 100 and survivors[-1] == 0, survivors


def test_each_round_errs_on_other_records() -> None:
    # A dead record kept by chance in one round must not be kept by every round.
    def records(net: int) -> list[FlowRecord]:
        ips = (f"10.{net}.{i // 250}.{i % 250}" for i in range(20_000))
        return [FlowRecord(entry((0, 6, ip, 1), 1, 0, True)) for ip in ips]

    marked, probes = records(1), records(2)
    wrong: list[set[FlowRecord]] = []
    for salt in (1, 2):
        marks = _Marks(len(marked), salt)
        for record in marked:
            marks.add(record)
        assert all(record in marks for record in marked)
        wrong.append({record for record in probes if record in marks})
        assert len(wrong[-1]) < len(probes) // 100
    assert wrong[0] and wrong[0] != wrong[1]
