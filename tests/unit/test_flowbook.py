"""core/flowbook.py: which entries the index takes as offloaded, the re-created and
idle books, the teardown order; property-tested against a plain model."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core.flowbook import (
    PORT_PROTOCOLS,
    TESTING_ALL_OFFLOADED,
    FlowBook,
    only_offloaded,
)
from controlplane.core.flowpath import IPS_OFFLOAD, CtTuple, Flow


def flow(n: int, proto: int = 6, status: int = 0) -> Flow:
    src = f"10.0.{n // 250}.{n % 250 + 1}"
    return Flow(
        orig=CtTuple(2, proto, src, "198.51.100.7", 40000 + n, 443),
        reply=CtTuple(2, proto, "198.51.100.7", src, 443, 40000 + n),
        id=n + 1,
        zone=n % 2,
        mark=0,
        status=status,
    )


flows = st.builds(
    flow,
    st.integers(0, 5),  # few: operations meet the same entries
    st.sampled_from([6, 17, 1, 132]),
    st.sampled_from([0, IPS_OFFLOAD, 0x10, 0x10 | IPS_OFFLOAD]),
)


def key(f: Flow) -> tuple[int, CtTuple]:
    return (f.zone, f.orig)


@given(flows, st.booleans())
def test_indexed_marks_only_what_may_be_offloaded_and_changes_nothing_else(
    f: Flow, strict: bool
) -> None:
    out = FlowBook(only_offloaded=strict).indexed(f)
    may = f.offloaded or f.orig.proto in PORT_PROTOCOLS or not strict
    assert out.offloaded == may
    assert replace(out, status=f.status) == f
    assert out.status & ~IPS_OFFLOAD == f.status & ~IPS_OFFLOAD


def test_the_test_switch_reads_one_variable() -> None:
    assert only_offloaded({}) and only_offloaded({TESTING_ALL_OFFLOADED: "0"})
    assert not only_offloaded({TESTING_ALL_OFFLOADED: "1"})
    with pytest.raises(ValueError, match="bound"):
        FlowBook(bound=0)


def test_a_recreated_entrys_echo_is_offloaded_once() -> None:
    book = FlowBook()
    icmp = flow(1, proto=1)  # not a port protocol: offloaded only as our re-create
    book.torn_down([icmp])
    assert book.changed(icmp, new=True, gone=False).offloaded
    assert not book.changed(icmp, new=True, gone=False).offloaded  # forgotten
    book.torn_down([icmp])
    assert not book.changed(icmp, new=False, gone=False).offloaded  # an UPDATE is not the echo
    assert not book.changed(icmp, new=False, gone=True).offloaded


# One operation on the book: (name, flows, statuses or flags).
ops = st.lists(
    st.one_of(
        st.tuples(st.just("torn_down"), st.lists(flows, max_size=4)),
        st.tuples(
            st.just("checked"),
            st.lists(st.tuples(flows, st.sampled_from([None, 0, IPS_OFFLOAD])), max_size=4),
        ),
        st.tuples(st.just("changed"), flows, st.booleans(), st.booleans()),
        st.tuples(st.just("order"), st.lists(flows, max_size=6)),
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(ops, st.integers(1, 5))
def test_the_books_follow_a_plain_model_and_stay_bounded(
    operations: list[tuple[object, ...]], bound: int
) -> None:
    book = FlowBook(bound=bound)
    idle: list[tuple[int, CtTuple]] = []  # the model: oldest first
    recreated: list[tuple[int, CtTuple]] = []
    for op in operations:
        if op[0] == "torn_down":
            batch = op[1]
            assert isinstance(batch, list)
            book.torn_down(batch)
            for f in batch:
                if key(f) not in recreated:
                    recreated.append(key(f))
            del recreated[: max(0, len(recreated) - bound)]
        elif op[0] == "checked":
            answers = op[1]
            assert isinstance(answers, list)
            offloaded, left = book.checked(answers)
            assert [key(f) for f in offloaded] == [
                key(f) for f, s in answers if s is not None and s & IPS_OFFLOAD
            ]
            assert [key(f) for f in left] == [key(f) for f, s in answers if s == 0]
            assert all(f.offloaded for f in left)  # re-indexed as possibly offloaded
            for f, s in answers:
                if s is None:
                    continue
                if key(f) in idle:
                    idle.remove(key(f))
                if not s & IPS_OFFLOAD:
                    idle.append(key(f))
            del idle[: max(0, len(idle) - bound)]
        elif op[0] == "changed":
            f, new, gone = op[1], op[2], op[3]
            assert isinstance(f, Flow) and isinstance(new, bool) and isinstance(gone, bool)
            echo = new and key(f) in recreated
            out = book.changed(f, new=new, gone=gone)
            if key(f) in idle:
                idle.remove(key(f))
            if echo:
                recreated.remove(key(f))
                assert out.offloaded
            elif gone:
                assert out == f
            else:
                assert out == book.indexed(f)
        else:
            batch = op[1]
            assert isinstance(batch, list)
            live, late = book.order(batch)
            assert live == [f for f in batch if key(f) not in idle]
            assert late == [f for f in batch if key(f) in idle]
        assert len(book) == len(idle) + len(recreated) <= 2 * bound
