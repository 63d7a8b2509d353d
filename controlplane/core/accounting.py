"""Forwarded packets and bytes by path (fast: flowtable, classic: forward hook)
as monotonic totals, from periodic readings. Pure.

The kernel has no counter of fast-path packets. With a flowtable's ``counter``
flag it adds each offloaded packet to its conntrack entry's counters, so the
fast path is the growth of the counters of entries *while they are offloaded*:
an entry is counted from the reading after it is first seen offloaded (before
that its counters hold its classic-path start), and what it carried after its
last reading is not counted when it ends between two readings. So the fast
total under-counts by at most one reading period per flow. Packets of
offloaded flows that still took the classic path (FIN/RST, a direction not
hooked) grow the entry's counters too; they are counted by the ruleset's
``classic_in_*`` counters and subtracted. The classic path is the forward
hook's ``classic_path`` counter (every forwarded packet that is not offloaded
crosses it). Counters that go backwards (the table was re-created) restart
from their new value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Counts", "PathTally"]

Counts = tuple[int, int]  # (packets, bytes)


def _growth(new: Counts, old: Counts | None) -> Counts:
    if old is None:
        return (0, 0)
    if new[0] < old[0] or new[1] < old[1]:  # reset (re-created): its new value is growth
        return new
    return (new[0] - old[0], new[1] - old[1])


@dataclass
class PathTally:
    """Fast and classic totals; :meth:`step` with each reading."""

    fast: Counts = (0, 0)
    classic: Counts = (0, 0)
    # Last reading of: each offloaded entry (conntrack id -> counters), the
    # classic_path counter, the classic_in_* sum (offloaded flows, classic path).
    _entries: dict[int, Counts] = field(default_factory=dict)
    _classic: Counts | None = None
    _classic_offloaded: Counts | None = None

    def step(
        self,
        offloaded_entries: Mapping[int, Counts] | None,
        classic: Counts | None,
        classic_offloaded: Counts | None,
    ) -> None:
        """One reading. ``offloaded_entries``: None when conntrack was not read
        (no flowtable counts); ``classic``/``classic_offloaded``: None when the
        table has no such counter."""
        if classic is not None:
            grown = _growth(classic, self._classic)
            self.classic = (self.classic[0] + grown[0], self.classic[1] + grown[1])
        self._classic = classic
        overlap = (
            _growth(classic_offloaded, self._classic_offloaded)
            if classic_offloaded is not None
            else (0, 0)
        )
        self._classic_offloaded = classic_offloaded
        if offloaded_entries is None:
            self._entries = {}
            return
        packets = bytes_ = 0
        for ct_id, now in offloaded_entries.items():
            old = self._entries.get(ct_id)
            if old is not None:
                grown = _growth(now, old)
                packets += grown[0]
                bytes_ += grown[1]
        self._entries = dict(offloaded_entries)
        packets = max(0, packets - overlap[0])
        bytes_ = max(0, bytes_ - overlap[1])
        self.fast = (self.fast[0] + packets, self.fast[1] + bytes_)

    def totals(self) -> dict[str, dict[str, int]]:
        """``{"fast": {"packets", "bytes"}, "classic": {...}}`` (the metrics' shape)."""
        return {
            "fast": {"packets": self.fast[0], "bytes": self.fast[1]},
            "classic": {"packets": self.classic[0], "bytes": self.classic[1]},
        }
