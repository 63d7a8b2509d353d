"""Start-up without a blind window: topology events that arrive while the index is built.

The service subscribes to rtnetlink and conntrack before it dumps conntrack, so no
event is lost; but an event queued behind the start-up dump (seconds for 100,000
entries on a host, ~80 s under TCG) used to wait for all of it, and the offloaded
flow it made stale stalled meanwhile. Handling it at once is not enough either:
the entries not dumped yet would be indexed later with the path that holds *after*
the event, not the one the flowtable cached, and never be torn down.

So the service reads the dump in steps and, between steps, asks :class:`StartupGate`
about each topology event:

- an event that changes nothing the engine knows (the kernel re-announces entries;
  the engine drops repeats) is handled at once, with nothing to look up;
- a change that concerns known addresses (an FDB entry: the addresses whose
  neighbour entry has that MAC; a neighbour entry: its address) is acted on at
  once, after the service has indexed those addresses' entries from a filtered
  dump (``kernel/ctnetlink/lookup.py``) under the caches as they were *before*
  the event: then the event finds them as it would with a complete index;
- anything else waits for the end of the dump, and so does every event after it,
  in order (what the service did before): a link, a route, lost events, and a
  change of a next hop (its flows are keyed by their destinations, which the event
  does not name): an address the indexed flows use as next hop, or one the
  look-up found no entry of (a gateway's own address has none).

Pure: the engine's caches and next hops are handed in.
"""

from __future__ import annotations

from collections.abc import Collection

from controlplane.core import events as ev
from controlplane.core.flowindex import FlowIndex
from controlplane.core.flowpath import Topology

__all__ = ["StartupGate", "addresses_of", "next_hops"]


def next_hops(index: FlowIndex) -> set[str]:
    """The gateways the indexed flows' routes go through."""
    return {r.gateway for g in index.groups() if (r := g.route) is not None and r.gateway}


def addresses_of(
    event: ev.Event, caches: Topology, next_hops: Collection[str]
) -> tuple[str, ...] | None:
    """The addresses whose entries must be indexed before ``event`` is handled; ``()``:
    none (the event changes nothing in ``caches``); None: not narrowed to addresses.

    An FDB entry concerns every address whose neighbour entry (on any device: a VLAN
    device on the bridge has its own) has that MAC; a neighbour entry, its address.
    Sorted, each once.
    """
    if isinstance(event, ev.LinkChanged):
        return () if caches.links.get(event.link.ifindex) == event.link else None
    if isinstance(event, ev.FdbEntryChanged | ev.FdbEntryRemoved):
        port = event.port if isinstance(event, ev.FdbEntryChanged) else None
        if caches.fdb.get((event.bridge, event.vlan, event.mac)) == port:
            return ()
        mac = event.mac
        found = sorted({ip for (_ifindex, ip), m in caches.neighbours.items() if m == mac})
    elif isinstance(event, ev.NeighbourChanged | ev.NeighbourRemoved):
        mac_now = event.mac if isinstance(event, ev.NeighbourChanged) else None
        if caches.neighbours.get((event.ifindex, event.ip)) == mac_now:
            return ()
        found = [event.ip]
    else:
        return None
    if any(ip in next_hops for ip in found):
        return None
    return tuple(found)


class StartupGate:
    """Which topology events the service acts on during the start-up dump.

    :meth:`admit` answers each event in arrival order: the addresses to look up
    before handling it now, or None: kept, handed back by :meth:`finish` in order;
    :meth:`looked_up` gets the look-up's result (no entry of a named address: a next
    hop, kept too). Once one event is kept every later one is kept too (an event must
    not overtake one before it), and :attr:`holding` tells the service to stop reading
    events (they wait in the kernel's socket buffer: bounded by it, not by us).
    """

    def __init__(self) -> None:
        self._held: list[ev.Event] = []

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def admit(
        self, event: ev.Event, caches: Topology, next_hops: Collection[str]
    ) -> tuple[str, ...] | None:
        if not self._held:
            found = addresses_of(event, caches, next_hops)
            if found is not None:
                return found
        self._held.append(event)
        return None

    def looked_up(self, event: ev.Event, addresses: tuple[str, ...], entries: int) -> bool:
        """Act on ``event`` now (True), or keep it: it named addresses and none of
        them has an entry."""
        if addresses and not entries:
            self._held.append(event)
            return False
        return True

    def finish(self) -> list[ev.Event]:
        """The events kept, in arrival order (the dump is complete: handle them now)."""
        held, self._held = self._held, []
        return held
