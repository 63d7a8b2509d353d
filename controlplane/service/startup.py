"""The start-up dump, read in steps, with topology events acted on in between.

``InvalidationService.start`` subscribes, hands the engine the topology snapshot,
then calls :func:`index_while_watching`: the conntrack dump is read
``STARTUP_STEP_ENTRIES`` at a time, and between steps the rtnetlink events queued
so far are put to :class:`~controlplane.core.startup.StartupGate` (which decides;
this module only carries): an event the gate admits is handled at once, after
the entries of the addresses it names are indexed from a filtered dump; the
others come back from :meth:`StartupGate.finish` for the service to handle once
the index is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

from controlplane.core import events as ev
from controlplane.core.flowpath import Flow, Topology
from controlplane.core.startup import StartupGate

__all__ = ["STARTUP_STEP_ENTRIES", "index_while_watching"]

# Entries decoded and indexed between two looks at the event socket: ~10 ms of
# work on the host (~100 ms under TCG), the longest a move waits during start-up.
STARTUP_STEP_ENTRIES = 1024


class Dump(Protocol):
    def fileno(self) -> int: ...

    def begin(self) -> None: ...

    def read(self, budget: int) -> tuple[list[Flow], bool]: ...


class Events(Protocol):
    def fileno(self) -> int: ...

    def poll(self, limit: int) -> list[ev.Event]: ...


def index_while_watching(
    *,
    dump: Dump,
    events: Events,
    wait: Callable[[Sequence[int], float], object],
    see: Callable[[Flow], None],
    act_on: Callable[[ev.Event], None],
    look_up: Callable[[tuple[str, ...]], Iterable[Flow]],
    caches: Callable[[], Topology],
    next_hops: Callable[[], Collection[str]],
    limit: int,
) -> list[ev.Event]:
    """Index every dumped entry (``see``); act on admitted events on the way (``see``
    their addresses' entries, then ``act_on`` the event). Returns the events held for
    after the dump, in order."""
    gate = StartupGate()
    dump.begin()
    complete = False
    while not complete:
        watch = [] if gate.holding else [events.fileno()]
        wait([dump.fileno(), *watch], 1.0)
        if not gate.holding:
            for event in events.poll(limit):
                addresses = gate.admit(event, caches(), next_hops())
                if addresses is None:
                    continue
                found = list(look_up(addresses)) if addresses else []
                if not gate.looked_up(event, addresses, len(found)):
                    continue
                for flow in found:
                    see(flow)
                act_on(event)
        flows, complete = dump.read(STARTUP_STEP_ENTRIES)
        for flow in flows:
            see(flow)
    return gate.finish()
