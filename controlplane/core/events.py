"""Events the watcher emits, actions the invalidation engine answers with.

The vocabulary between the kernel adapters (``kernel/rtnl/watcher.py``,
``kernel/ctnetlink``) and the pure engine (``core/invalidation.py``):

- **Events** are past-tense facts, one per kernel notification, as *upserts*:
  ``FdbEntryChanged`` says "this (bridge, vlan, mac) is now behind this port",
  whether or not the adapter knew the old port. The engine keeps the caches
  (FDB, neighbours, links) and detects moves itself (a MAC move is one
  RTM_NEWNEIGH with a new port and no delete), so events can be replayed,
  duplicated or re-derived from a dump without harm.
- **Actions** are imperative requests from the engine: ``TearDownFlows``,
  ``ResolveRoutes`` (the engine cannot look routes up: the adapter answers
  with ``RoutesResolved``), ``Resync`` (answer with ``Snapshot`` or
  ``FlowsDumped``).
- ``FlowsMarkedStale`` is a notice: what one event decided (for logs and
  ``offloadctl watch``); the kernel work comes batched from ``flush()``.
  ``TopologyChanged`` is a notice too: the engine's link cache changed (a device
  appeared, went, or joined or left a bridge), with the links as they are now,
  so the agent can re-plan the flowtable devices without reading the engine.

Constructors are keyword-only and normalise their inputs: addresses become
canonical text (as ``inet_ntop`` prints them), prefixes canonical networks
(``10.0.0.0/8``, ``2001:db8::/32``), MACs lower-case ``aa:bb:cc:dd:ee:ff``;
anything else raises ``ValueError`` naming the field.

Mapping kernel messages to events (what the adapters emit):

======================================  ====================================
RTM_NEWLINK                             ``LinkChanged(link=...)`` (full state,
                                        ``up`` = IFF_UP and IFF_LOWER_UP)
RTM_DELLINK                             ``LinkRemoved``
RTM_NEWNEIGH AF_BRIDGE with NDA_MASTER  ``FdbEntryChanged`` (port = ifindex)
RTM_DELNEIGH AF_BRIDGE with NDA_MASTER  ``FdbEntryRemoved``
RTM_NEWNEIGH ARP/NDP with a lladdr      ``NeighbourChanged``
RTM_NEWNEIGH INCOMPLETE/FAILED,         ``NeighbourRemoved``
RTM_DELNEIGH ARP/NDP
RTM_NEWROUTE/DELROUTE (any table),      ``RouteChanged(prefix=...)``; a rule
RTM_NEWRULE/DELRULE                     or address change: the family's /0
conntrack NEW/UPDATE, dump entries      ``FlowSeen`` (the engine keeps only
                                        entries with IPS_OFFLOAD)
conntrack DESTROY                       ``FlowGone``
ENOBUFS on either socket                ``EventsLost(source=...)``
======================================  ====================================

FDB entries on the bridge device itself (local addresses) and entries
without NDA_MASTER (a port's own NTF_SELF table) are not forwarding state:
adapters drop them, as ``kernel/rtnl/topology.snapshot`` does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from controlplane.core.flowpath import Flow, Link, Route, Topology

__all__ = [
    "Action",
    "AwaitNeighbour",
    "Event",
    "EventsLost",
    "FdbEntryChanged",
    "FdbEntryRemoved",
    "FlowGone",
    "FlowSeen",
    "FlowsDumped",
    "FlowsMarkedStale",
    "LinkChanged",
    "LinkRemoved",
    "NeighbourChanged",
    "NeighbourRemoved",
    "NeighbourWaitExpired",
    "ResolveRoutes",
    "Resync",
    "RouteChanged",
    "RoutesResolved",
    "Snapshot",
    "Source",
    "TearDownFlows",
    "TopologyChanged",
    "canonical_ip",
    "canonical_mac",
    "canonical_prefix",
]

# Which kernel socket lost events: rtnl (links, neighbours, FDB, routes) or
# conntrack (the flow index).
Source = Literal["rtnl", "conntrack"]
_SOURCES = ("rtnl", "conntrack")
_HEX = frozenset("0123456789abcdef")


def canonical_ip(value: str, field: str = "ip") -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{field}: {value!r} is not an IPv4 or IPv6 address") from None


def canonical_prefix(value: str, field: str = "prefix") -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"{field}: {value!r} is not an IPv4 or IPv6 prefix") from None


def canonical_mac(value: str, field: str = "mac") -> str:
    mac = value.lower()
    parts = mac.split(":")
    if len(parts) != 6 or any(len(p) != 2 or not _HEX.issuperset(p) for p in parts):
        raise ValueError(f"{field}: {value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return mac


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


def _check_index(value: int, field: str, *, zero: bool = False) -> None:
    if not isinstance(value, int) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{field}: {value!r} is not an interface index")


def _check_vlan(vlan: int) -> None:
    if not 0 <= vlan < 4096:
        raise ValueError(f"vlan: {vlan!r} is not a VLAN id (0-4095)")


# -- events: links -----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkChanged:
    """A device appeared or changed (RTM_NEWLINK): its full current state.

    Covers going down/up (``link.up``), joining or leaving a bridge
    (``link.master``), and VLAN/bridge attributes (``vlan_filtering``, ``pvid``).
    """

    link: Link


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkRemoved:
    """A device was unregistered (RTM_DELLINK)."""

    ifindex: int

    def __post_init__(self) -> None:
        _check_index(self.ifindex, "ifindex")


# -- events: bridge FDB --------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FdbEntryChanged:
    """``mac`` (on ``vlan``; 0 without VLAN filtering) is now behind ``port`` of ``bridge``.

    One RTM_NEWNEIGH (AF_BRIDGE, NDA_MASTER = bridge, ifindex = port); a move
    to another port arrives as just this, with no delete for the old port.
    """

    bridge: int
    vlan: int
    mac: str
    port: int

    def __post_init__(self) -> None:
        _check_index(self.bridge, "bridge")
        _check_index(self.port, "port")
        _check_vlan(self.vlan)
        _set(self, "mac", canonical_mac(self.mac))


@dataclass(frozen=True, slots=True, kw_only=True)
class FdbEntryRemoved:
    """The FDB entry for ``mac`` on ``vlan`` of ``bridge`` is gone (aged out, flushed, deleted)."""

    bridge: int
    vlan: int
    mac: str

    def __post_init__(self) -> None:
        _check_index(self.bridge, "bridge")
        _check_vlan(self.vlan)
        _set(self, "mac", canonical_mac(self.mac))


# -- events: neighbours (ARP / NDP) ------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NeighbourChanged:
    """``ip`` on device ``ifindex`` resolves to ``mac`` (a usable neighbour entry)."""

    ifindex: int
    ip: str
    mac: str

    def __post_init__(self) -> None:
        _check_index(self.ifindex, "ifindex")
        _set(self, "ip", canonical_ip(self.ip))
        _set(self, "mac", canonical_mac(self.mac))


@dataclass(frozen=True, slots=True, kw_only=True)
class NeighbourRemoved:
    """``ip`` on ``ifindex`` no longer resolves (deleted, or INCOMPLETE/FAILED)."""

    ifindex: int
    ip: str

    def __post_init__(self) -> None:
        _check_index(self.ifindex, "ifindex")
        _set(self, "ip", canonical_ip(self.ip))


@dataclass(frozen=True, slots=True, kw_only=True)
class NeighbourWaitExpired:
    """The wait an ``AwaitNeighbour`` asked for is over (sent by the service's clock,
    whether or not ``ip`` on ``ifindex`` resolved meanwhile)."""

    ifindex: int
    ip: str

    def __post_init__(self) -> None:
        _check_index(self.ifindex, "ifindex")
        _set(self, "ip", canonical_ip(self.ip))


# -- events: routes ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteChanged:
    """A route for ``prefix`` was added, replaced or deleted, in any table.

    The engine does not do longest-prefix match (the kernel does, with rules):
    it answers with ``ResolveRoutes`` for the indexed addresses inside
    ``prefix`` and decides from the ``RoutesResolved`` that follows. A rule or
    address change that may affect any route: the family's ``0.0.0.0/0`` / ``::/0``.
    """

    prefix: str

    def __post_init__(self) -> None:
        _set(self, "prefix", canonical_prefix(self.prefix))

    @property
    def family(self) -> int:
        return 10 if ":" in self.prefix else 2


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutesResolved:
    """Answers to ``ResolveRoutes``: ``ip route get`` per address (``None``: no route).

    The adapter may also volunteer lookups (e.g. after a dump); every answer
    is applied as the address's current route.
    """

    routes: Mapping[str, Route | None]

    def __post_init__(self) -> None:
        _set(self, "routes", MappingProxyType(dict(self.routes)))


# -- events: conntrack (the flow index) ---------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowSeen:
    """A conntrack entry (NEW/UPDATE event or dump). Only offloaded ones are indexed;
    seeing an indexed entry without IPS_OFFLOAD drops it from the index."""

    flow: Flow


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowGone:
    """A conntrack entry was destroyed (DESTROY event); matched by zone + original tuple."""

    flow: Flow


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowsDumped:
    """A full conntrack dump (start-up or resync): replaces the flow index."""

    flows: tuple[Flow, ...]


# -- events: loss and resync --------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsLost:
    """A socket overflowed (ENOBUFS): events from ``source`` are missing.

    The engine answers ``Resync(source=...)``; the adapter drains its socket,
    then sends a ``Snapshot`` (rtnl) or ``FlowsDumped`` (conntrack).
    """

    source: Source

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ValueError(f"source: {self.source!r} is not one of {', '.join(_SOURCES)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Full links, neighbours and FDB of the namespace (``topology.snapshot()``).

    The engine diffs it against its caches and handles every difference as
    the event that was lost; its ``routes`` (may be empty) are applied like
    ``RoutesResolved``, and the engine asks ``ResolveRoutes`` for every
    indexed address (route events may have been lost as well). Also the
    first event the engine needs: until then it only indexes flows.

    ``lost`` False (a periodic reconcile, no event known lost): only the
    differences count, no route is looked up again (routes, rules and addresses
    are always announced; what a reconcile looks for is FDB entries the kernel
    learned without saying so).
    """

    topology: Topology
    lost: bool = True


# -- actions (engine → adapter) and notices ----------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TearDownFlows:
    """Delete these conntrack entries (exact tuple, zone and id), re-creating them.

    ``causes[i]`` says why ``flows[i]`` is stale. Flows are deduplicated
    across the burst; the engine forgets them (their re-offload arrives as a
    new ``FlowSeen``).
    """

    flows: tuple[Flow, ...]
    causes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.flows) != len(self.causes):
            raise ValueError("causes: one cause per flow is required")


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolveRoutes:
    """Look up the route to each address (RTM_GETROUTE) and send ``RoutesResolved``."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class AwaitNeighbour:
    """Flows wait for ``ip`` on ``ifindex`` to resolve: send ``NeighbourWaitExpired`` for
    it once the service's wait is over (one wait per neighbour; a repeat is a no-op)."""

    ifindex: int
    ip: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Resync:
    """Drain ``source``, dump it, and send ``Snapshot`` (rtnl) or ``FlowsDumped`` (conntrack)."""

    source: Source


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowsMarkedStale:
    """Notice: one event made these flows stale (they are torn down at the next flush)."""

    cause: str
    flows: tuple[Flow, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TopologyChanged:
    """Notice: the engine's links changed (added, removed, up/down, bridge membership),
    at most once per handled event; ``links`` is the engine's link cache as it is now
    (ifindex -> Link, a read-only copy)."""

    links: Mapping[int, Link]

    def __post_init__(self) -> None:
        _set(self, "links", MappingProxyType(dict(self.links)))


Event = (
    LinkChanged
    | LinkRemoved
    | FdbEntryChanged
    | FdbEntryRemoved
    | NeighbourChanged
    | NeighbourRemoved
    | NeighbourWaitExpired
    | RouteChanged
    | RoutesResolved
    | FlowSeen
    | FlowGone
    | FlowsDumped
    | EventsLost
    | Snapshot
)
Action = (
    TearDownFlows | ResolveRoutes | AwaitNeighbour | Resync | FlowsMarkedStale | TopologyChanged
)
