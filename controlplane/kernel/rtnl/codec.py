"""The rtnetlink codec: one definition per message type, for dumps and events alike.

Links, neighbours/FDB and routes are decoded here and nowhere else: the
watcher's notifications, its snapshots (the dumps the engine diffs), the topology
snapshot and the route lookups all go through :func:`decode` /
:func:`decode_route_lookup`. Hand-written over :mod:`controlplane.kernel.netlink`
rather than pyroute2's decoder, which is ~10x slower per message
(``make bench-host``, bench/bench_codec.py; why it matters: docs/netlink.md).
pyroute2 stays the oracle: tests/unit/test_rtnl_oracle.py decodes recorded
kernel bytes with both and compares them field by field.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import TypeVar

from controlplane.core.flowpath import ETH_P_8021Q, Link, Route, Topology
from controlplane.kernel.netlink import (
    HDR,
    MALFORMED,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    attrs,
    malformed,
    message,
    nla,
)

__all__ = [
    "DUMPS",
    "Caches",
    "Decoded",
    "FdbMsg",
    "LinkMsg",
    "NeighMsg",
    "RouteMsg",
    "RouteState",
    "decode",
    "decode_route_lookup",
    "dump_request",
    "link_request",
    "route_request",
]

# rtnetlink message types
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
# multicast groups (RTNLGRP_*); bind() takes the bit 1 << (group - 1)
RTNLGRP_LINK = 1
RTNLGRP_NEIGH = 3  # carries both the bridge FDB (AF_BRIDGE) and ARP/NDP
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV6_ROUTE = 11
SOURCE_GROUPS = {
    "link": (RTNLGRP_LINK,),
    "fdb": (RTNLGRP_NEIGH,),
    "neigh": (RTNLGRP_NEIGH,),
    "route": (RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE),
}

AF_BRIDGE = 7
IFLA_IFNAME = 3
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VLAN_ID = 1
IFLA_VLAN_PROTOCOL = 5
IFLA_BR_VLAN_FILTERING = 7
IFLA_BR_VLAN_PROTOCOL = 8
IFLA_BR_VLAN_DEFAULT_PVID = 39
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
NDA_DST = 1
NDA_LLADDR = 2
NDA_VLAN = 5
NDA_MASTER = 9
NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_VIA = 18  # next hop of another family (IPv4 via IPv6, RFC 5549): struct rtvia
RT_TABLE_LOCAL = 255
# Route types whose traffic is delivered locally or flooded, never unicast-forwarded.
NOT_FORWARDED = frozenset({2, 3, 5})  # RTN_LOCAL, RTN_BROADCAST, RTN_MULTICAST

_IFINFOMSG = struct.Struct("=BxHiII")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTNEXTHOP = struct.Struct("=HBBi")  # struct rtnexthop: len, flags, hops, ifindex
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")
_BE16 = struct.Struct(">H")

_K = TypeVar("_K")
_V = TypeVar("_V")
FdbKey = tuple[int, int, str]  # (bridge ifindex, vlan, mac)
NeighKey = tuple[int, str]  # (ifindex, ip)
RouteKey = tuple[int, int, str]  # (table, family, prefix)


NextHop = tuple[int, str | None]  # (ifindex, gateway) of one path of a multipath route


@dataclass(frozen=True, slots=True)
class RouteState:
    oif: int | None
    gateway: str | None
    multipath: tuple[NextHop, ...] = ()  # RTA_MULTIPATH: every path, in the kernel's order


@dataclass
class Caches:
    """One dump of the namespace (what ``flowpath.Topology`` holds, plus the route table
    entries seen); the watcher keeps none: the engine's caches are the one cache."""

    links: dict[int, Link] = field(default_factory=dict)
    fdb: dict[FdbKey, int] = field(default_factory=dict)
    neighbours: dict[NeighKey, str] = field(default_factory=dict)
    routes: dict[RouteKey, RouteState] = field(default_factory=dict)

    def name(self, ifindex: int) -> str:
        link = self.links.get(ifindex)
        return link.name if link is not None else f"if{ifindex}"

    def topology(self) -> Topology:
        return Topology(
            links=dict(self.links), neighbours=dict(self.neighbours), fdb=dict(self.fdb)
        )

    def add(self, change: Decoded) -> None:
        """Record one message of a dump (events go through the watcher's ``translate``)."""
        if isinstance(change, LinkMsg):
            _put(self.links, change.ifindex, change.link)
        elif isinstance(change, FdbMsg):
            _put(self.fdb, change.key, change.port)
        elif isinstance(change, NeighMsg):
            _put(self.neighbours, change.key, change.mac)
        else:
            _put(self.routes, change.key, change.state)


def _put(table: dict[_K, _V], key: _K, value: _V | None) -> None:
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value


@dataclass(frozen=True, slots=True)
class LinkMsg:
    ifindex: int
    link: Link | None  # None: the link was deleted


@dataclass(frozen=True, slots=True)
class FdbMsg:
    key: FdbKey
    port: int | None  # None: the entry was deleted


@dataclass(frozen=True, slots=True)
class NeighMsg:
    key: NeighKey
    mac: str | None  # None: deleted, failed or incomplete


@dataclass(frozen=True, slots=True)
class RouteMsg:
    key: RouteKey
    state: RouteState | None  # None: deleted


Decoded = LinkMsg | FdbMsg | NeighMsg | RouteMsg


def _mac(raw: bytes) -> str:
    return raw.hex(":")


def _decode_link(kind: int, buf: bytes, start: int, end: int) -> LinkMsg | None:
    family, _type, ifindex, flags, _change = _IFINFOMSG.unpack_from(buf, start + HDR)
    if family == AF_BRIDGE:
        # The bridge's per-port copy (port state, VLANs): the AF_UNSPEC message
        # that accompanies it carries the link itself.
        return None
    if kind == RTM_DELLINK:
        return LinkMsg(ifindex, None)
    name = ""
    master = lower = vlan_id = pvid = None
    link_kind = ""
    vlan_protocol = ETH_P_8021Q
    filtering = False
    for a, s, e in attrs(buf, start + HDR + _IFINFOMSG.size, end):
        if a == IFLA_IFNAME:
            name = buf[s:e].rstrip(b"\0").decode()
        elif a == IFLA_MASTER:
            master = _U32.unpack_from(buf, s)[0] or None
        elif a == IFLA_LINK:
            lower = _U32.unpack_from(buf, s)[0] or None
        elif a == IFLA_LINKINFO:
            data: tuple[int, int] | None = None
            for i, ps, pe in attrs(buf, s, e):
                if i == IFLA_INFO_KIND:
                    link_kind = buf[ps:pe].rstrip(b"\0").decode()
                elif i == IFLA_INFO_DATA:
                    data = (ps, pe)
            if data is not None and link_kind == "vlan":
                for i, ps, _ in attrs(buf, *data):
                    if i == IFLA_VLAN_ID:
                        vlan_id = _U16.unpack_from(buf, ps)[0]
                    elif i == IFLA_VLAN_PROTOCOL:
                        vlan_protocol = _BE16.unpack_from(buf, ps)[0]
            elif data is not None and link_kind == "bridge":
                for i, ps, _ in attrs(buf, *data):
                    if i == IFLA_BR_VLAN_FILTERING:
                        filtering = bool(buf[ps])
                    elif i == IFLA_BR_VLAN_PROTOCOL:
                        vlan_protocol = _BE16.unpack_from(buf, ps)[0]
                    elif i == IFLA_BR_VLAN_DEFAULT_PVID:
                        pvid = _U16.unpack_from(buf, ps)[0]
    link = Link(
        ifindex=ifindex,
        name=name,
        kind=link_kind,
        master=master,
        lower=lower if link_kind == "vlan" else None,
        vlan_id=vlan_id,
        vlan_protocol=vlan_protocol,
        vlan_filtering=filtering,
        pvid=pvid,
        up=bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP),
    )
    return LinkMsg(ifindex, link)


def _decode_neigh(kind: int, buf: bytes, start: int, end: int) -> FdbMsg | NeighMsg | None:
    family, ifindex, state, _flags, _type = _NDMSG.unpack_from(buf, start + HDR)
    dst: bytes | None = None
    mac: str | None = None
    vlan = 0
    master: int | None = None
    for a, s, e in attrs(buf, start + HDR + _NDMSG.size, end):
        if a == NDA_LLADDR:
            mac = _mac(buf[s:e])
        elif a == NDA_DST:
            dst = buf[s:e]
        elif a == NDA_VLAN:
            vlan = _U16.unpack_from(buf, s)[0]
        elif a == NDA_MASTER:
            master = _U32.unpack_from(buf, s)[0]
    if family == AF_BRIDGE:
        # Entries without a master are the ports' own (NTF_SELF) tables;
        # entries on the bridge device itself are local, never a port.
        if master is None or mac is None or ifindex == master:
            return None
        return FdbMsg((master, vlan, mac), None if kind == RTM_DELNEIGH else ifindex)
    if family not in (socket.AF_INET, socket.AF_INET6) or dst is None:
        return None
    ip = socket.inet_ntop(family, dst)
    gone = kind == RTM_DELNEIGH or mac is None or state & (NUD_INCOMPLETE | NUD_FAILED)
    return NeighMsg((ifindex, ip), None if gone else mac)


def _gateway(kind: int, family: int, buf: bytes, s: int, e: int) -> str:
    """RTA_GATEWAY (an address of the route's family) or RTA_VIA (struct rtvia:
    its own family, then the address)."""
    if kind == RTA_VIA:
        return socket.inet_ntop(_U16.unpack_from(buf, s)[0], buf[s + 2 : e])
    return socket.inet_ntop(family, buf[s:e])


def _multipath(family: int, buf: bytes, start: int, end: int) -> tuple[NextHop, ...]:
    """RTA_MULTIPATH: struct rtnexthop after struct rtnexthop, each followed by
    its own attributes (RTNH_ALIGN: 4 bytes)."""
    hops: list[NextHop] = []
    offset = start
    while offset + _RTNEXTHOP.size <= end:
        length, _flags, _hops, ifindex = _RTNEXTHOP.unpack_from(buf, offset)
        if length < _RTNEXTHOP.size:
            raise ValueError(f"rtnexthop of length {length}")
        gateway = None
        for a, s, e in attrs(buf, offset + _RTNEXTHOP.size, offset + length):
            if a in (RTA_GATEWAY, RTA_VIA):
                gateway = _gateway(a, family, buf, s, e)
        hops.append((ifindex, gateway))
        offset += (length + 3) & ~3
    return tuple(hops)


@dataclass(frozen=True, slots=True)
class _Rt:
    """What a route message says that we use (header and attributes)."""

    family: int
    prefix: str
    table: int
    rtype: int
    oif: int | None
    gateway: str | None
    multipath: tuple[NextHop, ...]


def _route(buf: bytes, start: int, end: int) -> _Rt | None:
    """rtmsg at ``start`` (after the netlink header) → _Rt; None for a family
    other than IPv4/IPv6."""
    family, dst_len, _src_len, _tos, table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(
        buf, start
    )
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    dst = b"\0" * (4 if family == socket.AF_INET else 16)
    oif: int | None = None
    gateway: str | None = None
    multipath: tuple[NextHop, ...] = ()
    for a, s, e in attrs(buf, start + _RTMSG.size, end):
        if a == RTA_DST:
            dst = buf[s:e]
        elif a == RTA_OIF:
            oif = _U32.unpack_from(buf, s)[0]
        elif a in (RTA_GATEWAY, RTA_VIA):
            gateway = _gateway(a, family, buf, s, e)
        elif a == RTA_MULTIPATH:
            multipath = _multipath(family, buf, s, e)
        elif a == RTA_TABLE:
            table = _U32.unpack_from(buf, s)[0]
    prefix = f"{socket.inet_ntop(family, dst)}/{dst_len}"
    return _Rt(family, prefix, table, rtype, oif, gateway, multipath)


def _decode_route(kind: int, buf: bytes, start: int, end: int) -> RouteMsg | None:
    rt = _route(buf, start + HDR, end)
    if rt is None or rt.table == RT_TABLE_LOCAL:
        return None  # the local table: the router's own addresses, never a forwarding path
    state = None if kind == RTM_DELROUTE else RouteState(rt.oif, rt.gateway, rt.multipath)
    return RouteMsg((rt.table, rt.family, rt.prefix), state)


def decode_route_lookup(buf: bytes, start: int, end: int) -> Route | None:
    """The answer to RTM_GETROUTE for one address (header at ``start``): the path
    the kernel's FIB lookup chose (one next hop, even for a multipath route);
    KernelError for bytes the kernel would never send."""
    try:
        rt = _route(buf, start + HDR, end)
    except MALFORMED as exc:  # inet_ntop: ValueError for an unknown family too
        raise malformed("route lookup reply", exc) from None
    if rt is None:
        return None
    if rt.rtype in NOT_FORWARDED:
        return Route(oif=None, local=True)
    return Route(oif=rt.oif, gateway=rt.gateway)


def decode_own_address(buf: bytes, start: int, end: int) -> str | None:
    """A route of the local table (header at ``start``) that delivers to this
    host (local or broadcast) → its address; None for any other route."""
    try:
        rt = _route(buf, start + HDR, end)
    except MALFORMED as exc:
        raise malformed("route dump", exc) from None
    if rt is None or rt.table != RT_TABLE_LOCAL or rt.rtype not in NOT_FORWARDED:
        return None
    return rt.prefix.partition("/")[0]


def decode(kind: int, buf: bytes, start: int, end: int) -> Decoded | None:
    """One rtnetlink message (header at ``start``) → a typed change, None if
    irrelevant; KernelError for bytes the kernel would never send."""
    try:
        if kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
            return _decode_neigh(kind, buf, start, end)
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            return _decode_link(kind, buf, start, end)
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            return _decode_route(kind, buf, start, end)
    except MALFORMED as exc:
        raise malformed(f"rtnetlink message type {kind}", exc) from None
    return None


# Dumps that rebuild the caches, per source.
DUMPS: dict[str, tuple[tuple[int, int], ...]] = {
    "link": ((RTM_GETLINK, socket.AF_UNSPEC),),
    "fdb": ((RTM_GETNEIGH, AF_BRIDGE),),
    "neigh": ((RTM_GETNEIGH, socket.AF_INET), (RTM_GETNEIGH, socket.AF_INET6)),
    "route": ((RTM_GETROUTE, socket.AF_INET), (RTM_GETROUTE, socket.AF_INET6)),
}
_FAMILY_HEADER = {
    RTM_GETLINK: _IFINFOMSG.size,
    RTM_GETNEIGH: _NDMSG.size,
    RTM_GETROUTE: _RTMSG.size,
}


def dump_request(kind: int, family: int, seq: int, filters: bytes = b"") -> bytes:
    """NLM_F_DUMP request; ``filters``: attributes the kernel filters the dump by
    (e.g. IFLA_MASTER for a link dump)."""
    body = bytes([family]) + b"\0" * (_FAMILY_HEADER[kind] - 1) + filters
    return message(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def route_request(family: int, dst_len: int, attributes: bytes, seq: int) -> bytes:
    """RTM_GETROUTE for one destination (``ip route get``): ``attributes`` hold RTA_DST."""
    body = _RTMSG.pack(family, dst_len, 0, 0, 0, 0, 0, 0, 0) + attributes
    return message(RTM_GETROUTE, NLM_F_REQUEST, seq, body)


def link_request(seq: int, *, index: int = 0, name: str | None = None) -> bytes:
    """RTM_GETLINK for one link, by index or by name (answer: RTM_NEWLINK or ENODEV)."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    if name is not None:
        body += nla(IFLA_IFNAME, name.encode() + b"\0")
    return message(RTM_GETLINK, NLM_F_REQUEST, seq, body)
