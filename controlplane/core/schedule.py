"""When the invalidation service's periodic jobs are due: reconcile, prune, next-hop waits.

Pure: times are numbers on the service's clock, passed in. The service asks
:meth:`Schedule.timeout` how long it may block, and after waking what is due.

- **Reconcile** (``reconcile_seconds``): a fresh rtnetlink dump diffed against the
  engine's caches, for changes the kernel never announces (hardware-learned FDB
  entries, extern_learn). 0 disables it.
- **Prune** (``prune_seconds``): the flow index against a fresh conntrack dump,
  read in steps of :data:`PRUNE_STEP_ENTRIES`; the next round is scheduled when
  one ends (it may last several periods' worth of steps at 100,000 entries). 0
  disables it.
- **Next-hop waits** (``AwaitNeighbour``): flows wait :data:`NEXT_HOP_WAIT` for
  their new next hop to resolve before they are torn down anyway; one wait per
  next hop (a repeat keeps the first deadline).
"""

from __future__ import annotations

__all__ = ["NEXT_HOP_WAIT", "PRUNE_STEP_ENTRIES", "Schedule"]

# How long flows wait for their new next hop to resolve before they are torn down
# anyway (the engine decides which flows wait and why). The next hop resolves when
# traffic starts using it (its first ARP/ND exchange with the router: milliseconds),
# which after a route change can take a while: other routers and hosts change their
# routes too (in the VM under load, 0.3-0.6 s after ours). A 0.25 s wait expired
# first and brought the early teardown back (docs/kernel-facts.md, "Re-offload
# before the next hop resolves"). The wait only bounds a next hop nothing talks to;
# the flow keeps its cached path meanwhile.
NEXT_HOP_WAIT = 1.0

# Dump entries a prune handles per step (whole datagrams: ~150 entries each):
# ~5-8 ms of decoding and lookups, so events wait at most that long behind a
# prune (bench_invalidation.py measures the longest step at 100,000 entries).
PRUNE_STEP_ENTRIES = 256

_NEVER = float("inf")

NextHop = tuple[int, str]  # (ifindex, ip)


class Schedule:
    """Deadlines of the periodic jobs, on the caller's clock."""

    def __init__(self, *, reconcile_seconds: float, prune_seconds: float) -> None:
        periods = (("reconcile_seconds", reconcile_seconds), ("prune_seconds", prune_seconds))
        for name, value in periods:
            if not value >= 0:
                raise ValueError(f"{name}: {value!r} must be 0 (off) or more")
        self.reconcile_seconds = reconcile_seconds
        self.prune_seconds = prune_seconds
        self.next_reconcile = _NEVER
        self.next_prune = _NEVER
        self._waits: dict[NextHop, float] = {}  # next hop -> when its wait is over

    def _after(self, period: float, now: float) -> float:
        return now + period if period > 0 else _NEVER

    def start(self, now: float) -> None:
        """The service is running (its start-up dump done): first periods from ``now``."""
        self.next_reconcile = self._after(self.reconcile_seconds, now)
        self.next_prune = self._after(self.prune_seconds, now)

    # -- reconcile ----------------------------------------------------------------------

    def reconcile_due(self, now: float) -> bool:
        return now >= self.next_reconcile

    def reconciled(self, now: float) -> None:
        self.next_reconcile = self._after(self.reconcile_seconds, now)

    # -- prune --------------------------------------------------------------------------

    def prune_due(self, now: float) -> bool:
        return now >= self.next_prune

    def prune_started(self) -> None:
        """A round runs: no other starts until :meth:`prune_ended`."""
        self.next_prune = _NEVER

    def prune_ended(self, now: float) -> None:
        self.next_prune = self._after(self.prune_seconds, now)

    def prune_now(self) -> None:
        """Make a round due at once (tests, benchmarks)."""
        self.next_prune = -_NEVER

    # -- next-hop waits ----------------------------------------------------------------

    def wait(self, ifindex: int, ip: str, now: float) -> bool:
        """Start the wait for this next hop; False if one runs already (kept as is)."""
        if (ifindex, ip) in self._waits:
            return False
        self._waits[(ifindex, ip)] = now + NEXT_HOP_WAIT
        return True

    def expired(self, now: float) -> list[NextHop]:
        """The next hops whose wait is over at ``now`` (each once: forgotten)."""
        if not self._waits:
            return []
        over = [key for key, due in self._waits.items() if due <= now]
        for key in over:
            del self._waits[key]
        return over

    @property
    def waiting(self) -> int:
        return len(self._waits)

    # -- the loop -----------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When the next job is due (``inf``: none)."""
        waits = min(self._waits.values(), default=_NEVER)
        return min(self.next_reconcile, self.next_prune, waits)

    def timeout(self, requested: float | None, now: float) -> float | None:
        """How long a wait for events may block: ``requested`` (``None``: no limit),
        shortened to the next deadline, never negative."""
        if requested is None:
            return None
        return max(0.0, min(requested, self.next_deadline() - now))
