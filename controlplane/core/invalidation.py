"""The invalidation engine: which offloaded flows a topology change made stale.

Pure and sans-IO. The adapter feeds it events (``core/events.py``) and
carries out its actions::

    engine = Engine(Policy())
    engine.handle(Snapshot(topology=snapshot()))      # caches first
    engine.handle(FlowsDumped(flows=tuple(ct.dump(only_offloaded=True))))
    while True:
        for event in drain():                        # a burst, as it arrived
            for action in engine.handle(event):      # FlowsMarkedStale (log), Resync
                ...
        for action in engine.flush():                # ResolveRoutes, TearDownFlows (batched)
            ...                                      # ResolveRoutes → handle(RoutesResolved)

``handle`` only updates state and marks flows stale; ``flush`` returns the
kernel work for the whole burst: one ``ResolveRoutes`` with every address
to look up, and the stale flows deduplicated in ``TearDownFlows`` batches of
``Policy.batch``. The engine forgets a flow once it is marked stale (its
re-offload arrives as a new ``FlowSeen``).

**Which flows are stale** (:func:`judge`). Each direction of an offloaded
flow caches an :class:`~controlplane.core.flowpath.Egress`, taken when the
flow is indexed. A direction whose egress is *bridged* uses direct transmit:
the kernel cached the output port and the next hop's MAC and never looks
again, so the flow stalls if either changes (docs/kernel-facts.md, "How a flow
caches its path": "Direct transmit goes stale; neighbour transmit heals", 7 of 7
bridged transfers stalled).
It is stale when a device on its cached chain is gone or down, when the
neighbour entry is gone, or when the egress now resolves differently (moved
port, new MAC, new route). One exception: an FDB entry that aged out (the
flowtable's ingress hook runs before the bridge's rx handler, so the bridge
learns nothing from offloaded traffic and entries of busy hosts age out) is
no evidence of a move; the flow keeps its cached port and is judged when
the MAC is learned again. A bridged egress that was incomplete when indexed
(neighbour or FDB entry already gone: the kernel may have offloaded it
before) counts as direct too, so its first change tears it down once
(a conservative choice: one classic-path packet). Routed directions use
neighbour transmit (a per-packet neighbour lookup and dst check) and heal by
themselves, so by default they are never torn down: a teardown would cost a
classic-path packet and buy nothing. ``Policy.all_paths`` treats every
direction as direct (hardware-offloaded flowtables cache every path);
``Policy.exhaustive_links`` also tears down routed flows through a device
that went down or away.

**Timing of a teardown** (docs/kernel-facts.md, "Re-offload before the next hop
resolves"). The kernel re-offloads a torn-down flow on its next packet, silently,
and caches a direct path only if the next hop's neighbour entry is valid *then*.
So a direct flow whose route moved to a next hop not resolved yet is not torn
down at once (:func:`awaited`): it keeps its cached path, the engine asks the
service to wait (``AwaitNeighbour``), and the flow is torn down when that
neighbour appears (``NeighbourChanged``) or the wait is over
(``NeighbourWaitExpired``). And a connection torn down earlier that comes back
(re-created, or picked up by a packet, :func:`conn_key`) after a neighbour entry
of its egress appeared or changed is torn down once more (``Engine._recheck``).

**Links**: whenever an event changes the link cache (a device added, removed,
up or down, joining or leaving a bridge), the event's actions end with one
``TopologyChanged`` notice carrying the links as they are now: the agent re-plans
the flowtable devices from it. The engine's caches (links, neighbours, FDB) are
the only topology cache: the watcher only decodes (``kernel/rtnl/watcher.py``).

**Transitions** live in one table, :data:`TRANSITIONS` (event type →
handler), as h11 keeps its state machine: everything that changes the
engine's state is there. An event type missing from it is a caller bug
(``TypeError``).

**Cost**: an event finds its flows through :class:`~controlplane.core.flowindex.FlowIndex`
(by device, neighbour, FDB key or address prefix) and re-resolves only the
groups it touches: its cost follows the flows it touches (~35 us per stale
flow, ~2 ms for a host move with 50 flows at 100,000 indexed, see
``bench/bench_engine.py``). Only ``Snapshot`` and ``FlowsDumped`` (resyncs)
walk everything; a route change for ``0.0.0.0/0`` asks for every address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from controlplane.core.events import (
    Action,
    AwaitNeighbour,
    Event,
    EventsLost,
    FdbEntryChanged,
    FdbEntryRemoved,
    FlowGone,
    FlowsDumped,
    FlowSeen,
    FlowsMarkedStale,
    LinkChanged,
    LinkRemoved,
    NeighbourChanged,
    NeighbourRemoved,
    NeighbourWaitExpired,
    ResolveRoutes,
    Resync,
    RouteChanged,
    RoutesResolved,
    Snapshot,
    TearDownFlows,
    TopologyChanged,
)
from controlplane.core.flowindex import DepKey, FlowIndex, FlowRecord, Group
from controlplane.core.flowpath import (
    Egress,
    FdbKey,
    Flow,
    Link,
    NeighbourKey,
    Route,
    Topology,
    egress_via,
)

__all__ = ["TRANSITIONS", "ConnKey", "Engine", "Policy", "awaited", "conn_key", "judge"]

# A connection whichever side conntrack saw first (zone, protocol, both endpoints).
ConnKey = tuple[int, int, frozenset[tuple[str, int]]]


def conn_key(flow: Flow) -> ConnKey:
    """The connection of a conntrack entry. A torn-down entry comes back re-created by us
    (same tuples) or, if a packet reached conntrack first, picked up mid-stream by the
    kernel, possibly from the other side (tuples swapped, without NAT): the same key."""
    o = flow.orig
    return (flow.zone, o.proto, frozenset(((o.src, o.sport), (o.dst, o.dport))))


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """What the engine tears down.

    ``all_paths``: also routed (neighbour-transmit) directions whose egress
    changed; ``exhaustive_links``: also routed flows through a device that
    went down or away; ``batch``: most flows per ``TearDownFlows``;
    ``remember``: most torn-down connections kept for the re-check after a
    teardown (oldest forgotten first; ~400 bytes each, a route change tears
    down the flows of a few next hops at a time).
    """

    all_paths: bool = False
    exhaustive_links: bool = False
    batch: int = 4096
    remember: int = 4096

    def __post_init__(self) -> None:
        for name in ("batch", "remember"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be at least 1")


def _newly_down(cached: Egress, now: Egress) -> str | None:
    """A device of the cached chain that went down or away since it was cached."""
    down = set(now.down).difference(cached.down).intersection(cached.devices)
    return f"device {min(down)} down or gone" if down else None


def awaited(cached: Egress | None, now: Egress, policy: Policy) -> NeighbourKey | None:
    """The new next hop a direct-transmit direction waits for before it is torn down.

    The route moved to another IPv4 next hop whose neighbour entry is not valid yet
    (the router never talked to it). Torn down now, the flow would be re-offloaded by
    its next packet with no valid neighbour entry to cache: neighbour transmit through
    the bridge device, or, if that packet still came through the old next hop, a path
    "on link" through the old device that never delivers (docs/kernel-facts.md,
    "Re-offload before the next hop resolves"; the next hop's ARP request teaches the
    router its address as soon as it forwards to us). Kept on the path it cached until the
    neighbour appears (``NeighbourChanged``) or the service's wait is over
    (``NeighbourWaitExpired``): then it is torn down and re-offloaded on a resolved path.
    """
    if cached is None or not (cached.bridged or policy.all_paths):
        return None
    if not (now.bridged or policy.all_paths):
        return None  # neighbour transmit resolves by itself: torn down now, it heals
    if now.mac is not None or cached.mac is None or now.neighbour in (None, cached.neighbour):
        return None
    if ":" in now.neighbour[1]:
        # IPv6 has no "on link" return path to fear (the lookup fails, the flow stays on
        # the classic path), and a next hop's own solicitations come from its link-local
        # address: its global address resolves only once the router sends to it, i.e.
        # after the teardown. Torn down at once; _recheck repairs an early re-offload.
        return None
    return now.neighbour if _newly_down(cached, now) is None else None


def judge(
    cached: Egress | None, now: Egress, policy: Policy, *, wait: bool = True
) -> tuple[str | None, Egress]:
    """Is a direction that cached ``cached`` stale, given it resolves to ``now``?

    Returns ``(why, keep)``: ``why`` is ``None`` if not stale; ``keep`` is
    what the direction caches from now on. ``cached`` ``None``: not yet
    known (route unresolved), nothing to judge. Idempotent:
    ``judge(keep, now)`` is ``(None, keep)``, so judging a flow again when
    nothing changed is harmless. ``wait`` False: a direction that waits for
    its new next hop (:func:`awaited`) waits no longer.
    """
    if cached is None:
        return None, now
    if not (cached.bridged or policy.all_paths):
        # Neighbour transmit: the kernel re-checks per packet; after a route
        # change its dst check re-offloads the flow with the new egress.
        return (_newly_down(cached, now) if policy.exhaustive_links else None), now
    if now == cached:
        return None, cached
    gone = _newly_down(cached, now)
    if gone is not None:
        return gone, now
    if now.mac is None and cached.mac is not None:
        if wait and awaited(cached, now, policy) is not None:
            return None, cached  # keep the cached path until the new next hop resolves
        return "neighbour gone", now
    if (
        not now.complete
        and now.mac == cached.mac
        and now.fdb == cached.fdb
        and set(cached.devices) <= set(now.devices)
        and set(cached.down) >= set(now.down).intersection(cached.devices)
    ):
        return None, cached  # FDB entry aged out: keep the port the flow was offloaded to
    return "egress changed", now


class Engine:
    """``(state, event) → (state, actions)``: caches, flow index, pending teardowns."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self._links: dict[int, Link] = {}
        self._neighbours: dict[tuple[int, str], str] = {}
        self._fdb: dict[FdbKey, int] = {}
        # flowpath reads the caches through this view (routes come per group).
        self._topology = Topology(links=self._links, neighbours=self._neighbours, fdb=self._fdb)
        self._index = FlowIndex()
        self._ready = False  # a Snapshot has filled the caches
        self._routes_wanted: dict[str, None] = {}
        self._stale: dict[FlowRecord, tuple[Flow, str]] = {}
        # The re-check after a teardown (see _recheck): flushes so far (a teardown
        # runs at the end of its epoch's flush), the epoch each neighbour entry last
        # appeared or changed in, the epoch each torn-down connection was torn down in.
        self._epoch = 0
        self._neighbour_epoch: dict[NeighbourKey, int] = {}
        self._torn: dict[ConnKey, int] = {}
        self._await: dict[NeighbourKey, None] = {}  # next hops to announce (AwaitNeighbour)
        self._links_changed = False  # by the event being handled (TopologyChanged)

    # -- public API -------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; returns notices (``FlowsMarkedStale``) and ``Resync``."""
        handler = TRANSITIONS.get(type(event))
        if handler is None:
            raise TypeError(f"not an invalidation event: {type(event).__name__}")
        actions = handler(self, event)
        if self._links_changed:
            self._links_changed = False
            actions.append(TopologyChanged(links=self._links))
        return actions

    def flush(self) -> list[Action]:
        """The kernel work for everything handled since the last flush, teardowns first
        (they are what the event -> gone latency measures; route answers may mark
        more flows stale, for the next flush)."""
        actions: list[Action] = []
        stale = list(self._stale.values())
        self._stale.clear()
        for first in range(0, len(stale), self.policy.batch):
            chunk = stale[first : first + self.policy.batch]
            actions.append(
                TearDownFlows(flows=tuple(f for f, _ in chunk), causes=tuple(c for _, c in chunk))
            )
        wanted = [a for a in self._routes_wanted if self._index.knows(a)]
        self._routes_wanted.clear()
        if wanted:
            actions.append(ResolveRoutes(addresses=tuple(wanted)))
        actions += (AwaitNeighbour(ifindex=i, ip=ip) for i, ip in self._await)
        self._await.clear()
        self._epoch += 1
        return actions

    def __len__(self) -> int:
        """Indexed offloaded flows."""
        return len(self._index)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def index(self) -> FlowIndex:
        """The flow index, to read (a prune diffs it against a dump); change it through events."""
        return self._index

    @property
    def pending(self) -> int:
        """Flows marked stale, to be returned by the next :meth:`flush`."""
        return len(self._stale)

    def name(self, ifindex: int) -> str:
        """A device's name as the link cache has it (``if7`` when unknown)."""
        return self._topology.name(ifindex)

    @property
    def caches(self) -> Topology:
        """The caches themselves (links, neighbours, FDB), to read without a copy (the
        start-up gate, core/startup.py); change them through events."""
        return self._topology

    def topology(self) -> Topology:
        """A copy of the caches (links, neighbours, FDB)."""
        return Topology(
            links=dict(self._links), neighbours=dict(self._neighbours), fdb=dict(self._fdb)
        )

    def flows(self) -> Iterator[tuple[Flow, Egress | None, Egress | None]]:
        """Indexed flows with the egress each direction cached (orig, reply)."""
        for record in self._index:
            yield record.flow(), record.orig, record.reply

    # -- machinery ----------------------------------------------------------------

    def _resolve(self, group: Group) -> Egress | None:
        if not self._ready:
            return None
        route, nexthop = group.key
        return egress_via(self._topology, route, nexthop or "")

    def _mark(self, record: FlowRecord, cause: str, marked: list[Flow]) -> None:
        self._index.remove(record)
        if record not in self._stale:
            flow = record.flow()
            self._stale[record] = (flow, cause)
            marked.append(flow)
            key = conn_key(flow)
            self._torn.pop(key, None)  # re-inserted last: the newest is forgotten last
            self._torn[key] = self._epoch
            while len(self._torn) > self.policy.remember:  # bounded: oldest first out
                del self._torn[next(iter(self._torn))]

    def _recheck(self, record: FlowRecord, marked: list[Flow]) -> None:
        """A connection we tore down is back (re-created by us or by a packet) and both
        its directions are placed: judge it against the kernel's view, not ours.

        The kernel re-offloads the entry on its next forwarded packet, silently, with
        the path it resolves *then*: with the next hop's neighbour entry not valid yet,
        it caches a path we cannot see (neighbour transmit through the bridge device,
        or for IPv4 a path "on link" through the input device, which never delivers:
        docs/kernel-facts.md, "Re-offload before the next hop resolves"). Our egress
        is computed later, from the caches as they are when the routes come back. So
        if a neighbour entry of its egress appeared or changed after the teardown
        ran, the flow is torn down once more: its next re-offload sees a valid one.
        """
        if not self._torn or record.orig is None or record.reply is None:
            return
        torn = self._torn.pop(conn_key(record.flow()), None)
        if torn is None:
            return
        for egress in (record.orig, record.reply):
            hop = egress.neighbour
            if (
                hop is not None
                and (egress.bridged or self.policy.all_paths)
                and self._neighbour_epoch.get(hop, -1) > torn
            ):
                cause = f"next hop {hop[1]} on {self._name(hop[0])} changed after the teardown"
                self._mark(record, cause, marked)
                return

    def _judge_address(
        self, address: str, now: Egress | None, cause: str, marked: list[Flow], *, wait: bool = True
    ) -> None:
        """Judge the directions of ``address``'s flows that leave toward it."""
        if now is None:
            return
        verdicts: dict[int, tuple[str | None, Egress]] = {}  # by id(cached)
        for record in self._index.flows_of(address):
            why: str | None = None
            unplaced = record.orig is None or record.reply is None
            for direction in ("orig", "reply"):
                if (record.rsrc if direction == "orig" else record.osrc) != address:
                    continue
                cached = getattr(record, direction)
                verdict = verdicts.get(id(cached))
                if verdict is None:
                    verdict = verdicts[id(cached)] = judge(cached, now, self.policy, wait=wait)
                    if verdict[0] is None and verdict[1] is cached and cached != now:
                        hop = awaited(cached, now, self.policy)
                        if hop is not None:
                            self._await[hop] = None
                setattr(record, direction, verdict[1])
                why = why or verdict[0]
            if why is not None:
                self._mark(record, f"{cause}: {why}", marked)
            elif unplaced:
                self._recheck(record, marked)

    def _refresh(self, groups: list[Group], cause: str) -> list[Action]:
        """Re-resolve ``groups``; judge their flows if the egress changed."""
        marked: list[Flow] = []
        for group in groups:
            if group.addresses is None:
                continue  # emptied by an earlier teardown in this loop
            now = self._resolve(group)
            if now == group.egress:
                continue
            self._index.set_egress(group, now)
            for address in self._index.group_addresses(group):
                self._judge_address(address, now, cause, marked)
        return self._notice(cause, marked)

    def _refresh_keys(self, keys: list[DepKey], cause: str) -> list[Action]:
        return self._refresh(self._index.groups_by(keys), cause)

    @staticmethod
    def _notice(cause: str, marked: list[Flow]) -> list[Action]:
        if not marked:
            return []
        return [FlowsMarkedStale(cause=cause, flows=tuple(marked))]

    def _name(self, ifindex: int | None) -> str:
        return self._topology.name(ifindex) if ifindex is not None else "-"

    def _place(self, address: str, route: Route | None, marked: list[Flow]) -> None:
        moved = self._index.place(address, route)
        if moved is None:
            return
        _old, group = moved
        if group.egress is None:
            self._index.set_egress(group, self._resolve(group))
        self._judge_address(address, group.egress, f"route to {address} changed", marked)

    # -- transitions ------------------------------------------------------------------

    def _on_flow_seen(self, event: FlowSeen) -> list[Action]:
        marked: list[Flow] = []
        self._see(FlowRecord(event.flow), marked)
        return self._notice("torn-down flow back", marked)

    def _see(self, record: FlowRecord, marked: list[Flow]) -> None:
        if not record.offloaded:
            self._index.remove(record)  # left the fast path: nothing cached any more
            return
        indexed = self._index.get(record)
        if indexed is not None:
            if indexed.same_entry(record):
                return
            # The same tuple under a new conntrack id (or mark, or reply tuple): the
            # indexed entry died (its DESTROY unseen) and this one replaced it; a
            # teardown by the old id would miss the live entry.
            self._index.remove(indexed)
            self._stale.pop(indexed, None)
        for address in self._index.add(record):
            self._routes_wanted[address] = None
        orig, reply = self._index.group_of(record.rsrc), self._index.group_of(record.osrc)
        record.cache(
            orig.egress if orig is not None else None, reply.egress if reply is not None else None
        )
        self._recheck(record, marked)

    def _on_flow_gone(self, event: FlowGone) -> list[Action]:
        record = FlowRecord(event.flow)
        self._index.remove(record)
        self._stale.pop(record, None)  # already gone from the kernel
        return []

    def _on_flows_dumped(self, event: FlowsDumped) -> list[Action]:
        dumped = dict.fromkeys(map(FlowRecord, event.flows))
        for record in self._index:
            if record not in dumped:
                self._index.remove(record)
        marked: list[Flow] = []
        for record in dumped:
            self._see(record, marked)
        return self._notice("torn-down flow back", marked)

    def _on_link_changed(self, event: LinkChanged) -> list[Action]:
        link = event.link
        old = self._links.get(link.ifindex)
        if old == link:
            return []
        self._links[link.ifindex] = link
        self._links_changed = True
        keys: list[DepKey] = [link.ifindex]
        if old is None:
            cause = f"link {link.name} added"
        elif old.up and not link.up:
            cause = f"link {link.name} down"
        elif old.master != link.master:
            cause = (
                f"link {link.name} left {self._name(old.master)}"
                if old.master is not None
                else f"link {link.name} joined {self._name(link.master)}"
            )
        else:
            cause = f"link {link.name} changed"
        if old is None or old.master != link.master:
            # Membership changed: paths that assumed every port of these bridges.
            keys.extend(m for m in (old.master if old else None, link.master) if m is not None)
        return self._refresh_keys(keys, cause)

    def _on_link_removed(self, event: LinkRemoved) -> list[Action]:
        old = self._links.pop(event.ifindex, None)
        if old is None:
            return []
        self._links_changed = True
        keys: list[DepKey] = [event.ifindex]
        if old.master is not None:
            keys.append(old.master)
        self._forget_device(event.ifindex)
        return self._refresh_keys(keys, f"link {old.name} removed")

    def _forget_device(self, ifindex: int) -> None:
        """The kernel flushes the FDB and neighbour entries of an unregistered device
        without a notification per entry: mirror it."""
        for key in [k for k, port in self._fdb.items() if port == ifindex or k[0] == ifindex]:
            del self._fdb[key]
        for nkey in [k for k in self._neighbours if k[0] == ifindex]:
            del self._neighbours[nkey]
            self._neighbour_epoch.pop(nkey, None)

    def _on_fdb_changed(self, event: FdbEntryChanged) -> list[Action]:
        key = (event.bridge, event.vlan, event.mac)
        old = self._fdb.get(key)
        if old == event.port:
            return []
        self._fdb[key] = event.port
        where = f"{event.mac} vlan {event.vlan} on {self._name(event.bridge)}"
        if old is None:
            cause = f"{where} learned on {self._name(event.port)}"
        else:
            cause = f"{where} moved {self._name(old)} -> {self._name(event.port)}"
        return self._refresh_keys([key], cause)

    def _on_fdb_removed(self, event: FdbEntryRemoved) -> list[Action]:
        key = (event.bridge, event.vlan, event.mac)
        if self._fdb.pop(key, None) is None:
            return []
        cause = f"{event.mac} vlan {event.vlan} on {self._name(event.bridge)} removed"
        return self._refresh_keys([key], cause)

    def _on_neighbour_changed(self, event: NeighbourChanged) -> list[Action]:
        key = (event.ifindex, event.ip)
        old = self._neighbours.get(key)
        if old == event.mac:
            return []
        self._neighbours[key] = event.mac
        self._neighbour_epoch[key] = self._epoch
        cause = f"neighbour {event.ip} on {self._name(event.ifindex)} is {event.mac}"
        return self._refresh_keys([key], cause + (f" (was {old})" if old else ""))

    def _on_neighbour_removed(self, event: NeighbourRemoved) -> list[Action]:
        key = (event.ifindex, event.ip)
        if self._neighbours.pop(key, None) is None:
            return []
        self._neighbour_epoch.pop(key, None)
        cause = f"neighbour {event.ip} on {self._name(event.ifindex)} removed"
        return self._refresh_keys([key], cause)

    def _on_wait_expired(self, event: NeighbourWaitExpired) -> list[Action]:
        key = (event.ifindex, event.ip)
        cause = f"next hop {event.ip} on {self._name(event.ifindex)} still unresolved"
        marked: list[Flow] = []
        for group in self._index.groups_by([key]):
            for address in self._index.group_addresses(group):
                self._judge_address(address, group.egress, cause, marked, wait=False)
        return self._notice(cause, marked)

    def _on_route_changed(self, event: RouteChanged) -> list[Action]:
        for address in self._index.addresses_in(event.prefix):
            self._routes_wanted[address] = None
        return []

    def _on_routes_resolved(self, event: RoutesResolved) -> list[Action]:
        marked: list[Flow] = []
        for address, route in event.routes.items():
            self._place(address, route, marked)
        return self._notice("route changed", marked)

    def _on_events_lost(self, event: EventsLost) -> list[Action]:
        return [Resync(source=event.source)]

    def _on_snapshot(self, event: Snapshot) -> list[Action]:
        topology = event.topology
        if not self._ready:
            # Events handled before the first snapshot are older than it.
            self._links.clear()
            self._links.update(topology.links)
            self._neighbours.clear()
            self._neighbours.update(topology.neighbours)
            self._fdb.clear()
            self._fdb.update(topology.fdb)
            self._ready = True
            self._links_changed = True
            for group in self._index.groups():
                self._index.set_egress(group, self._resolve(group))
            for record in self._index:
                for direction, address in (("orig", record.rsrc), ("reply", record.osrc)):
                    placed = self._index.group_of(address)
                    if getattr(record, direction) is None and placed is not None:
                        setattr(record, direction, placed.egress)
            actions: list[Action] = []
        else:
            actions = self._diff(topology)
        if topology.routes:
            actions += self._on_routes_resolved(RoutesResolved(routes=topology.routes))
        if event.lost:
            for address in self._index.addresses():  # route events may have been lost too
                self._routes_wanted[address] = None
        return actions

    def _diff(self, topology: Topology) -> list[Action]:
        """Handle every difference between the caches and a snapshot as its lost event."""
        actions: list[Action] = []
        for ifindex in self._links.keys() - topology.links.keys():
            actions += self._on_link_removed(LinkRemoved(ifindex=ifindex))
        for link in topology.links.values():
            actions += self._on_link_changed(LinkChanged(link=link))
        for ifindex, ip in self._neighbours.keys() - topology.neighbours.keys():
            actions += self._on_neighbour_removed(NeighbourRemoved(ifindex=ifindex, ip=ip))
        for (ifindex, ip), mac in topology.neighbours.items():
            if self._neighbours.get((ifindex, ip)) != mac:
                actions += self._on_neighbour_changed(
                    NeighbourChanged(ifindex=ifindex, ip=ip, mac=mac)
                )
        for bridge, vlan, mac in self._fdb.keys() - topology.fdb.keys():
            actions += self._on_fdb_removed(FdbEntryRemoved(bridge=bridge, vlan=vlan, mac=mac))
        for (bridge, vlan, mac), port in topology.fdb.items():
            if self._fdb.get((bridge, vlan, mac)) != port:
                actions += self._on_fdb_changed(
                    FdbEntryChanged(bridge=bridge, vlan=vlan, mac=mac, port=port)
                )
        return actions


# Every state change of the engine, by event type (h11's rule: the table is the machine).
TRANSITIONS: dict[type[Any], Callable[[Engine, Any], list[Action]]] = {
    LinkChanged: Engine._on_link_changed,
    LinkRemoved: Engine._on_link_removed,
    FdbEntryChanged: Engine._on_fdb_changed,
    FdbEntryRemoved: Engine._on_fdb_removed,
    NeighbourChanged: Engine._on_neighbour_changed,
    NeighbourRemoved: Engine._on_neighbour_removed,
    NeighbourWaitExpired: Engine._on_wait_expired,
    RouteChanged: Engine._on_route_changed,
    RoutesResolved: Engine._on_routes_resolved,
    FlowSeen: Engine._on_flow_seen,
    FlowGone: Engine._on_flow_gone,
    FlowsDumped: Engine._on_flows_dumped,
    EventsLost: Engine._on_events_lost,
    Snapshot: Engine._on_snapshot,
}
