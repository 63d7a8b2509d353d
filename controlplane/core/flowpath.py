"""Which flows use which devices: the pure resolver behind flow teardown.

Removing a device from a flowtable does not tear down the flows offloaded
through it, and a moved MAC, a changed neighbour or a changed route leave
stale fast-path entries too. In every case the fix is the same: find exactly
the conntrack entries whose offloaded path uses the affected devices and
delete them (the next packet recreates the entry on the classic path).

This module mirrors how the kernel builds that path when it offloads a flow
(``nft_flow_route`` + ``dev_fill_forward_path``), from plain data:

- direction ``orig`` leaves toward ``reply.src`` (the real destination, after
  DNAT); direction ``reply`` leaves toward ``orig.src`` (the real source);
- the output device comes from the route to that address; the next hop is the
  gateway if there is one, else the address itself;
- from the output device down: a VLAN device leads to its lower device (QinQ:
  twice); a bridge leads, through the next hop's MAC and the FDB (keyed by the
  VLAN on a VLAN-filtering bridge), to one port; every device met is on the
  path.

The ingress devices of one direction are the egress devices of the other (the
kernel forces the reverse route through the input interface), so the union of
both egress chains is every device the flow touches on this router.

When the snapshot lacks a fact the kernel had at offload time (FDB entries age
out while the bridge sees no offloaded packets; neighbours go stale), the
resolver over-approximates: all ports of the bridge, flagged ``ambiguous``.
A spurious teardown costs one slow-path packet; a missed one leaves a flow
forwarding through a device the control plane removed.

Addresses are text in canonical form (as ``inet_ntop`` prints them), MACs are
lower-case ``aa:bb:cc:dd:ee:ff``: the adapters produce exactly these.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

__all__ = [
    "EGRESS_LOCAL",
    "EGRESS_NOWHERE",
    "ETH_P_8021AD",
    "ETH_P_8021Q",
    "IPS_ASSURED",
    "IPS_CONFIRMED",
    "IPS_DST_NAT",
    "IPS_HW_OFFLOAD",
    "IPS_NAT_CLASH",
    "IPS_OFFLOAD",
    "IPS_SEEN_REPLY",
    "IPS_SEQ_ADJUST",
    "IPS_SRC_NAT",
    "CtTuple",
    "Egress",
    "EgressPath",
    "Family",
    "FdbKey",
    "Flow",
    "FlowPath",
    "Link",
    "NeighbourKey",
    "Route",
    "Topology",
    "egress",
    "egress_path",
    "egress_via",
    "flow_egress_addresses",
    "resolve_flow_path",
    "resolve_paths",
    "select_flows_through",
]

# include/uapi/linux/netfilter/nf_conntrack_common.h (enum ip_conntrack_status).
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SEQ_ADJUST = 1 << 6
IPS_NAT_CLASH = 1 << 12  # = IPS_UNTRACKED
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15  # the flow is in a NIC too
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8

# dev_fill_forward_path() gives up after NET_DEVICE_PATH_STACK_MAX (5) hops;
# we allow a little more and stop rather than loop on an inconsistent snapshot.
_MAX_HOPS = 8


class Family(IntEnum):
    """Layer-3 family, numerically equal to AF_INET / AF_INET6."""

    IPV4 = 2
    IPV6 = 10


@dataclass(frozen=True, slots=True)
class CtTuple:
    """One direction of a conntrack entry (``CTA_TUPLE_ORIG`` / ``CTA_TUPLE_REPLY``).

    ``sport``/``dport`` are the ports of TCP, UDP, SCTP, DCCP and UDP-Lite;
    ICMP and ICMPv6 use ``icmp_id``/``icmp_type``/``icmp_code`` instead.
    """

    family: int
    proto: int
    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    icmp_id: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None


@dataclass(frozen=True, slots=True)
class Flow:
    """A conntrack entry: its two tuples plus what a delete needs to hit it exactly."""

    orig: CtTuple
    reply: CtTuple
    id: int = 0
    zone: int = 0
    mark: int = 0
    status: int = 0

    @property
    def offloaded(self) -> bool:
        return bool(self.status & IPS_OFFLOAD)

    def as_dict(self) -> dict[str, object]:
        """The fields ``offloadctl flows --json`` prints for every flow (the CLI and
        the agent's control socket answer with the same keys)."""
        o, r = self.orig, self.reply
        return {
            "id": self.id,
            "zone": self.zone,
            "proto": o.proto,
            "family": int(o.family),
            "src": o.src,
            "dst": o.dst,
            "sport": o.sport,
            "dport": o.dport,
            "reply_src": r.src,
            "reply_dst": r.dst,
            "reply_sport": r.sport,
            "reply_dport": r.dport,
            "offloaded": self.offloaded,
        }


@dataclass(frozen=True, slots=True)
class Link:
    """A network device as the path resolver needs it.

    ``lower`` is the device under a VLAN device (``IFLA_LINK``); ``master`` is
    the bridge a port is enslaved to. For a VLAN device ``vlan_id`` and
    ``vlan_protocol`` describe its tag; for a bridge ``vlan_protocol`` is the
    bridge's and ``pvid`` its default PVID. ``up``: the device can transmit
    (administratively up with carrier); a flow cached through a device that is
    not up is stale.
    """

    ifindex: int
    name: str
    kind: str = ""
    master: int | None = None
    lower: int | None = None
    vlan_id: int | None = None
    vlan_protocol: int = ETH_P_8021Q
    vlan_filtering: bool = False
    pvid: int | None = None
    up: bool = True


@dataclass(frozen=True, slots=True)
class Route:
    """Result of a route lookup (``ip route get ADDR``): where packets to ADDR leave.

    ``local``: the address is the router's own (or broadcast/multicast); a
    flow with such an endpoint is not forwarded, so it has no path at all.
    """

    oif: int | None
    gateway: str | None = None
    local: bool = False


@dataclass(frozen=True)
class Topology:
    """A snapshot of one network namespace's forwarding state.

    ``neighbours``: ``(ifindex, ip) → mac``; ``fdb``: ``(bridge ifindex, vlan,
    mac) → port ifindex`` (vlan 0 on a bridge without VLAN filtering);
    ``routes``: ``ip → Route`` (``None``: no route).
    """

    links: Mapping[int, Link] = field(default_factory=dict)
    neighbours: Mapping[tuple[int, str], str] = field(default_factory=dict)
    fdb: Mapping[tuple[int, int, str], int] = field(default_factory=dict)
    routes: Mapping[str, Route | None] = field(default_factory=dict)

    def ifindex(self, name: str) -> int | None:
        for link in self.links.values():
            if link.name == name:
                return link.ifindex
        return None

    def ports_of(self, bridge: int) -> list[int]:
        return sorted(i for i, link in self.links.items() if link.master == bridge)

    def name(self, ifindex: int) -> str:
        link = self.links.get(ifindex)
        return link.name if link is not None else f"if{ifindex}"


@dataclass(frozen=True, slots=True)
class EgressPath:
    """The devices packets toward one address leave through, top device first.

    ``ambiguous``: a fact was missing (neighbour, FDB entry) and ``devices``
    is a superset; ``reason`` says which. ``local``: the address is the
    router's own. An empty path means local or unroutable.
    """

    devices: tuple[int, ...]
    ambiguous: bool = False
    reason: str = ""
    local: bool = False


_LOCAL = EgressPath((), local=True)
_NOWHERE = EgressPath(())


@dataclass(frozen=True, slots=True)
class FlowPath:
    """The egress chains of both directions of a flow."""

    orig: EgressPath
    reply: EgressPath

    @property
    def devices(self) -> frozenset[int]:
        return frozenset(self.orig.devices) | frozenset(self.reply.devices)

    @property
    def ambiguous(self) -> bool:
        return self.orig.ambiguous or self.reply.ambiguous


def flow_egress_addresses(flow: Flow) -> tuple[str, str]:
    """Addresses the two directions are routed toward: (orig egress, reply egress).

    NAT-aware: ``reply.src`` is the real destination after DNAT, and
    ``orig.src`` the real source before SNAT/masquerade.
    """
    return flow.reply.src, flow.orig.src


def egress_path(topology: Topology, address: str) -> EgressPath:
    """The device chain packets to ``address`` leave through (cf. ``dev_fill_forward_path``)."""
    route = topology.routes.get(address)
    if route is not None and route.local:
        return _LOCAL
    if route is None or route.oif is None:
        return _NOWHERE
    trace = _trace(topology, route, address)
    return EgressPath(trace.devices, ambiguous=bool(trace.notes), reason="; ".join(trace.notes))


FdbKey = tuple[int, int, str]
NeighbourKey = tuple[int, str]


@dataclass(frozen=True, slots=True)
class Egress:
    """What the kernel caches for one direction of a flow it offloads, from plain data.

    ``nft_flow_route`` keeps, per direction, the route's device and (for
    *direct transmit*) the output port and next hop's MAC. Direct transmit is
    chosen when the device chain passes a bridge (``nft_dev_path_info``:
    DEV_PATH_BRIDGE), so only ``bridged`` egresses can go stale: a routed
    port uses *neighbour transmit*, a per-packet neighbour lookup plus a dst
    check, and heals by itself (docs/kernel-facts.md, "How a flow caches its path").

    ``devices``: as :func:`egress_path` (a superset when ``complete`` is
    false); ``mac``: the next hop's MAC (``None``: no neighbour entry);
    ``neighbour`` and ``fdb``: the neighbour and FDB keys the lookup consulted,
    found or not (what an event must match to change this egress);
    ``down``: devices on the chain that are down or unknown.
    ``local``: the address is the router's own; no devices and not local:
    unroutable.
    """

    devices: tuple[int, ...] = ()
    mac: str | None = None
    bridged: bool = False
    complete: bool = True
    local: bool = False
    neighbour: NeighbourKey | None = None
    fdb: tuple[FdbKey, ...] = ()
    down: tuple[int, ...] = ()


EGRESS_LOCAL = Egress(local=True)
EGRESS_NOWHERE = Egress()


def egress(topology: Topology, address: str) -> Egress:
    """The cached state of a direction toward ``address``, routed by ``topology.routes``."""
    return egress_via(topology, topology.routes.get(address), address)


def egress_via(topology: Topology, route: Route | None, address: str) -> Egress:
    """As :func:`egress`, with the route to ``address`` given (``ip route get`` result)."""
    if route is not None and route.local:
        return EGRESS_LOCAL
    if route is None or route.oif is None:
        return EGRESS_NOWHERE
    trace = _trace(topology, route, address)
    return Egress(
        devices=trace.devices,
        mac=trace.mac,
        bridged=trace.bridged,
        complete=not trace.notes,
        neighbour=(route.oif, route.gateway or address),
        fdb=tuple(dict.fromkeys(trace.fdb)),
        down=tuple(dict.fromkeys(trace.down)),
    )


@dataclass(slots=True)
class _Trace:
    mac: str | None
    devices: tuple[int, ...] = ()
    bridged: bool = False
    notes: list[str] = field(default_factory=list)
    fdb: list[FdbKey] = field(default_factory=list)
    down: list[int] = field(default_factory=list)


def _trace(topology: Topology, route: Route, address: str) -> _Trace:
    assert route.oif is not None
    nexthop = route.gateway or address
    trace = _Trace(mac=topology.neighbours.get((route.oif, nexthop)))
    devices: list[int] = []
    _walk(topology, route.oif, trace, [], devices, 0)
    # A device can be reached twice only through an over-approximation; keep
    # the first occurrence so the chain still reads top-down.
    trace.devices = tuple(dict.fromkeys(devices))
    return trace


def _walk(
    topology: Topology,
    ifindex: int,
    trace: _Trace,
    vlans: list[tuple[int, int]],
    out: list[int],
    depth: int,
) -> None:
    out.append(ifindex)
    link = topology.links.get(ifindex)
    if link is None or not link.up:
        trace.down.append(ifindex)
    if link is None or depth >= _MAX_HOPS:
        return
    if link.kind == "vlan" and link.lower is not None:
        # vlan_dev_fill_forward_path(): push the tag, continue on the real device.
        tag = (link.vlan_id or 0, link.vlan_protocol)
        _walk(topology, link.lower, trace, [*vlans, tag], out, depth + 1)
        return
    if link.kind != "bridge":
        return  # no ndo_fill_forward_path: the chain ends on this device
    trace.bridged = True
    vid = 0
    if link.vlan_filtering:
        # br_vlan_fill_forward_path_pvid(): the innermost tag if its protocol
        # is the bridge's, else the bridge's PVID.
        if vlans and vlans[-1][1] == link.vlan_protocol:
            vid = vlans[-1][0]
            vlans = vlans[:-1]
        else:
            vid = link.pvid or 0
    mac = trace.mac
    port = None
    if mac is not None:
        trace.fdb.append((ifindex, vid, mac))
        port = topology.fdb.get((ifindex, vid, mac))
        port_link = topology.links.get(port) if port is not None else None
        if port_link is None or port_link.master != ifindex:
            port = None  # the port left the bridge or is gone; its FDB entries go with it
    if port is not None and port != ifindex:
        _walk(topology, port, trace, vlans, out, depth + 1)
        return
    why = "no neighbour entry" if mac is None else f"no FDB entry for {mac} vlan {vid}"
    trace.notes.append(f"{link.name}: {why}, assuming every port")
    for member in topology.ports_of(ifindex):
        _walk(topology, member, trace, vlans, out, depth + 1)


def _flow_path(orig: EgressPath, reply: EgressPath) -> FlowPath:
    # A flow to or from the router itself goes through the input/output hooks,
    # never the forward hook where flowtables offload: it uses no device here.
    if orig.local or reply.local:
        return FlowPath(_LOCAL, _LOCAL)
    return FlowPath(orig, reply)


def resolve_flow_path(topology: Topology, flow: Flow) -> FlowPath:
    orig_addr, reply_addr = flow_egress_addresses(flow)
    return _flow_path(egress_path(topology, orig_addr), egress_path(topology, reply_addr))


def resolve_paths(topology: Topology, flows: Iterable[Flow]) -> dict[Flow, FlowPath]:
    """Paths of many flows; each address is resolved once (flows share few endpoints)."""
    path_to = functools.cache(functools.partial(egress_path, topology))
    result: dict[Flow, FlowPath] = {}
    for flow in flows:
        orig_addr, reply_addr = flow_egress_addresses(flow)
        result[flow] = _flow_path(path_to(orig_addr), path_to(reply_addr))
    return result


def select_flows_through(
    flows: Iterable[Flow], paths: Mapping[Flow, FlowPath], devices: Collection[int]
) -> list[Flow]:
    """The flows (in input order) whose resolved path uses any of ``devices`` (ifindexes).

    Every flow must have a path in ``paths`` (``resolve_paths`` gives one):
    a missing one is a caller bug and raises ``KeyError``.
    """
    wanted = frozenset(devices)
    selected: list[Flow] = []
    for flow in flows:
        path = paths[flow]
        if not wanted.isdisjoint(path.orig.devices) or not wanted.isdisjoint(path.reply.devices):
            selected.append(flow)
    return selected
