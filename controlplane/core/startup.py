"""Start-up without a blind window: topology events that arrive while the index is built.

The service subscribes to rtnetlink and conntrack before it dumps conntrack, so no
event is lost; but an event queued behind the start-up dump (seconds for 100,000
entries on a host, ~80 s under TCG) used to wait for all of it, and the offloaded
flow it made stale stalled meanwhile. Handling it at once is not enough either:
the entries not dumped yet would be indexed later with the path that holds *after*
the event, not the one the flowtable cached, and never be torn down.

So the service reads the dump in steps and, between steps, asks :class:`StartupGate`
about each topology event:

- an event that concerns known addresses (an FDB entry: the addresses whose
  neighbour entry has that MAC; a neighbour entry: its address) is acted on at
  once, after the service has indexed those addresses' entries from a filtered
  dump (``kernel/ctnetlink/lookup.py``) under the caches as they were *before* the
  event: then the event finds them as it would with a complete index;
- an event that cannot be narrowed to addresses (a link, a route, lost events, or
  a MAC or address that is a next hop: the flows behind a gateway have other
  addresses) waits for the end of the dump, and so does every event after it, in
  order: what the service did before.

Pure: the neighbour table and the gateways are handed in.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from controlplane.core import events as ev

__all__ = ["StartupGate", "addresses_of"]

Neighbours = Mapping[tuple[int, str], str]  # (ifindex, ip) -> mac


def addresses_of(
    event: ev.Event, neighbours: Neighbours, gateways: Collection[str]
) -> tuple[str, ...] | None:
    """The addresses whose flows ``event`` may make stale; None: not narrowed to addresses.

    An FDB entry concerns every address whose neighbour entry (on any device: a VLAN
    device on the bridge has its own) has that MAC; a neighbour entry, its address.
    Sorted, each once. A next hop's flows are keyed by their destinations, which the
    event does not name: None.
    """
    if isinstance(event, ev.FdbEntryChanged | ev.FdbEntryRemoved):
        found = sorted({ip for (_ifindex, ip), mac in neighbours.items() if mac == event.mac})
    elif isinstance(event, ev.NeighbourChanged | ev.NeighbourRemoved):
        found = [event.ip]
    else:
        return None
    if any(ip in gateways for ip in found):
        return None
    return tuple(found)


class StartupGate:
    """Which topology events the service acts on during the start-up dump.

    :meth:`admit` answers each event in arrival order: the addresses to look up
    before handling it now, or None: kept, handed back by :meth:`finish` in order.
    Once one event is kept every later one is kept too (an event must not overtake
    one before it), and :attr:`holding` tells the service to stop reading events
    (they wait in the kernel's socket buffer: bounded by it, not by us).
    """

    def __init__(self) -> None:
        self._held: list[ev.Event] = []

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def admit(
        self, event: ev.Event, neighbours: Neighbours, gateways: Collection[str]
    ) -> tuple[str, ...] | None:
        if not self._held:
            found = addresses_of(event, neighbours, gateways)
            if found is not None:
                return found
        self._held.append(event)
        return None

    def finish(self) -> list[ev.Event]:
        """The events kept, in arrival order (the dump is complete: handle them now)."""
        held, self._held = self._held, []
        return held
