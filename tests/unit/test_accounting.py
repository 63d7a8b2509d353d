"""Fast/classic forwarded totals from periodic readings (core/accounting.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from controlplane.core.accounting import PathTally


def test_fast_path_is_growth_while_offloaded_minus_its_classic_packets() -> None:
    t = PathTally()
    t.step({1: (10, 1000)}, (5, 500), (0, 0))  # first sight: a baseline, nothing counted
    assert t.totals()["fast"] == {"packets": 0, "bytes": 0}
    t.step({1: (110, 11000), 2: (3, 300)}, (8, 800), (2, 200))
    # entry 1 grew 100/10000, 2 of which (200 B) took the classic path; 2 is new
    assert t.totals() == {
        "fast": {"packets": 98, "bytes": 9800},
        "classic": {"packets": 3, "bytes": 300},
    }
    t.step({2: (13, 1300)}, (8, 800), (2, 200))  # 1 ended: dropped; 2 grew 10
    assert t.fast == (108, 10800)


def test_counters_that_restart_count_from_their_new_value() -> None:
    t = PathTally()
    t.step(None, (100, 10_000), None)
    t.step(None, (5, 500), None)  # the table was re-created
    assert t.classic == (5, 500)


def test_without_conntrack_counts_fast_stays_zero() -> None:
    t = PathTally()
    for n in range(3):
        t.step(None, (n, n), (n, n))
    assert t.fast == (0, 0) and t.classic == (2, 2)


COUNTS = st.tuples(st.integers(0, 10**6), st.integers(0, 10**9))
Reading = tuple[dict[int, tuple[int, int]], tuple[int, int], tuple[int, int]]


@given(st.lists(st.tuples(st.dictionaries(st.integers(1, 5), COUNTS), COUNTS, COUNTS)))
def test_totals_never_decrease(steps: list[Reading]) -> None:
    t = PathTally()
    before = (t.fast, t.classic)
    for entries, classic, overlap in steps:
        t.step(entries, classic, overlap)
        now = (t.fast, t.classic)
        assert all(
            a <= b
            for old, new in zip(before, now, strict=True)
            for a, b in zip(old, new, strict=True)
        )
        before = now
