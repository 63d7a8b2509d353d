"""core/schedule.py: reconcile, prune and next-hop-wait deadlines, against a model."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core.schedule import NEXT_HOP_WAIT, Schedule

periods = st.sampled_from([0.0, 0.5, 30.0, 60.0])
times = st.floats(0, 1e6, allow_nan=False)


@given(periods, periods, times, st.one_of(st.none(), st.floats(0, 1e4, allow_nan=False)))
def test_a_wait_never_blocks_past_the_next_deadline(
    reconcile: float, prune: float, now: float, requested: float | None
) -> None:
    s = Schedule(reconcile_seconds=reconcile, prune_seconds=prune)
    s.start(now)
    timeout = s.timeout(requested, now)
    if requested is None:
        assert timeout is None
        return
    assert timeout is not None and 0 <= timeout <= requested
    assert now + timeout <= s.next_deadline() or timeout == requested
    due = [p for p in (reconcile, prune) if p > 0]
    assert s.next_deadline() == (now + min(due) if due else math.inf)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["wait", "tick"]),
            st.sampled_from([(3, "10.0.0.1"), (3, "fd00::1"), (4, "10.0.0.1")]),
            st.floats(0, 3),
        ),
        max_size=30,
    )
)
def test_each_next_hop_expires_once_after_its_first_wait(
    ops: list[tuple[str, tuple[int, str], float]],
) -> None:
    s = Schedule(reconcile_seconds=0, prune_seconds=0)
    now = 0.0
    model: dict[tuple[int, str], float] = {}
    for op, hop, dt in ops:
        now += dt
        if op == "wait":
            assert s.wait(*hop, now) == (hop not in model)
            model.setdefault(hop, now + NEXT_HOP_WAIT)
        else:
            over = s.expired(now)
            assert sorted(over) == sorted(h for h, due in model.items() if due <= now)
            for h in over:
                del model[h]
        assert s.waiting == len(model)
        assert s.next_deadline() == min(model.values(), default=math.inf)


def test_reconcile_and_prune_periods() -> None:
    s = Schedule(reconcile_seconds=30, prune_seconds=60)
    s.start(100)
    assert not s.reconcile_due(129.9) and s.reconcile_due(130)
    s.reconciled(131)
    assert s.next_reconcile == 161
    assert s.prune_due(160)
    s.prune_started()  # a round runs: none other is due, however long it takes
    assert not s.prune_due(1e9) and s.next_deadline() == 161
    s.prune_ended(200)
    assert s.next_prune == 260
    s.prune_now()
    assert s.prune_due(0)
    off = Schedule(reconcile_seconds=0, prune_seconds=0)
    off.start(5)
    assert off.next_deadline() == math.inf and not off.reconcile_due(1e12)
    with pytest.raises(ValueError, match="prune_seconds"):
        Schedule(reconcile_seconds=0, prune_seconds=-1)
