"""Topology adapter: snapshot links, neighbours, FDB and routes into ``flowpath.Topology``.

Sockets are opened inside the namespace asked for (:class:`NetlinkSocket`), so
the snapshot is of that namespace even when the caller lives elsewhere. Links,
neighbours and the FDB are dumped and decoded by :mod:`.codec`, the decoder the
watcher uses for its events, so a snapshot and a stream of events mean the
same. Routes are looked up per address (RTM_GETROUTE, i.e. ``ip route get``)
rather than dumped: the kernel's own FIB lookup already applies rules, metrics,
multipath selection and longest-prefix match, which we would otherwise have to
reimplement. Those lookups go through the shared batched request loop of
``kernel/netlink.py`` (pyroute2's ``route("get")``: ~540 us per address,
docs/netlink.md).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from functools import partial

from controlplane.core.flowpath import Link, Route, Topology
from controlplane.errors import KernelError
from controlplane.kernel.netlink import NLMSGHDR, NetlinkSocket, nla
from controlplane.kernel.netns import entered
from controlplane.kernel.rtnl.codec import (
    DUMPS,
    IFLA_MASTER,
    RTA_DST,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    Caches,
    LinkMsg,
    decode,
    decode_own_address,
    decode_route_lookup,
    dump_request,
    link_request,
    route_request,
)

__all__ = [
    "bridge_ports",
    "dump",
    "encode_route_get",
    "get_link",
    "link_names",
    "local_routes",
    "lookup_routes",
    "lookup_routes_on",
    "ports_of",
    "snapshot",
]

# Answers of RTM_GETROUTE that mean "no forwarding route", not a failure.
_NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES, errno.EINVAL, errno.EAGAIN}
_U32 = struct.Struct("=I")


def dump(nl: NetlinkSocket, sources: Iterable[str]) -> Caches:
    """Dump ``sources`` (keys of ``codec.DUMPS``; links first, so the others can be
    named) into fresh caches, each message through the one decoder."""
    caches = Caches()

    def on_message(kind: int, buf: bytes, start: int, end: int) -> None:
        change = decode(kind, buf, start, end)
        if change is not None:
            caches.add(change)

    wanted = set(sources)
    for source in sorted(wanted, key=lambda s: (s != "link", s)):
        for kind, family in DUMPS[source]:
            nl.dump("rtnetlink dump", partial(dump_request, kind, family), on_message)
    return caches


def get_link(nl: NetlinkSocket, *, index: int = 0, name: str | None = None) -> Link | None:
    """One link by index or name; None if there is no such device."""
    for reply in nl.transact(
        "read link", [name or index], lambda _, seq: link_request(seq, index=index, name=name)
    ):
        if reply.code == errno.ENODEV:
            return None
        if reply.code:
            raise KernelError("read link", os.strerror(reply.code), reply.code, payload=reply.item)
        change = decode(RTM_NEWLINK, reply.data, 0, len(reply.data))
        if isinstance(change, LinkMsg):
            return change.link
    return None


def ports_of(nl: NetlinkSocket, bridge: int) -> list[Link]:
    """The links enslaved to ``bridge``: the kernel filters the dump by IFLA_MASTER,
    so only the ports are decoded, not every link of the namespace."""
    found: list[Link] = []

    def on_message(kind: int, buf: bytes, start: int, end: int) -> None:
        change = decode(kind, buf, start, end)
        if isinstance(change, LinkMsg) and change.link is not None:
            found.append(change.link)

    master = nla(IFLA_MASTER, _U32.pack(bridge))
    kind, family = DUMPS["link"][0]
    nl.dump("list bridge ports", lambda seq: dump_request(kind, family, seq, master), on_message)
    return found


def encode_route_get(address: str, seq: int) -> bytes:
    """RTM_GETROUTE for one address (``ip route get ADDR``)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    raw = socket.inet_pton(family, address)
    return route_request(family, len(raw) * 8, nla(RTA_DST, raw), seq)


def local_routes(addresses: Iterable[str], netns: str | None) -> dict[str, Route | None]:
    """Which of ``addresses`` are the namespace's own (local or broadcast routes of
    the local table; multicast): as :func:`lookup_routes` would mark them
    ``local``, from one dump instead of a lookup per address. The others map to
    None (not looked up): enough to tell forwarded flows from local ones."""
    own: set[str] = set()

    def on_message(kind: int, buf: bytes, start: int, end: int) -> None:
        if kind == RTM_NEWROUTE and (address := decode_own_address(buf, start, end)):
            own.add(address)

    with NetlinkSocket(socket.NETLINK_ROUTE, netns, operation="route dump") as nl:
        for kind, family in DUMPS["route"]:
            nl.dump("route dump", partial(dump_request, kind, family), on_message)
    local = Route(oif=None, local=True)
    return {
        a: local if a in own or ipaddress.ip_address(a).is_multicast else None for a in addresses
    }


def lookup_routes(addresses: Iterable[str], netns: str | None) -> dict[str, Route | None]:
    """``ip route get`` for each address, many requests per send (one answer each)."""
    with NetlinkSocket(socket.NETLINK_ROUTE, netns, operation="route lookup") as nl:
        return lookup_routes_on(nl, addresses)


def lookup_routes_on(nl: NetlinkSocket, addresses: Iterable[str]) -> dict[str, Route | None]:
    """:func:`lookup_routes` over an open NETLINK_ROUTE socket (a long-running
    caller keeps one: opening a socket in a namespace costs more than a lookup)."""
    routes: dict[str, Route | None] = {}
    for reply in nl.transact("route lookup", sorted(set(addresses)), encode_route_get):
        if reply.code == 0 and reply.data:
            route = _lookup_answer(reply.data)
            if route is not None:
                routes[reply.item] = route
                continue
        if reply.code not in _NO_ROUTE:
            raise KernelError(
                "route lookup", os.strerror(reply.code), reply.code, payload=reply.item
            )
        routes[reply.item] = None
    return routes


def _lookup_answer(data: bytes) -> Route | None:
    kind = NLMSGHDR.unpack_from(data)[1]
    return decode_route_lookup(data, 0, len(data)) if kind == RTM_NEWROUTE else None


def snapshot(addresses: Iterable[str] = (), netns: str | None = None) -> Topology:
    """Links, neighbours, bridge FDB, and the route to each of ``addresses``."""
    with NetlinkSocket(socket.NETLINK_ROUTE, netns, operation="topology snapshot") as nl:
        caches = dump(nl, ("link", "neigh", "fdb"))
        routes = lookup_routes_on(nl, addresses)
    return Topology(links=caches.links, neighbours=caches.neighbours, fdb=caches.fdb, routes=routes)


def link_names(netns: str | None = None) -> set[str]:
    # libc's if_nameindex(3) is one RTM_GETLINK dump decoded in C: 2,000 links
    # in ~2 ms, where decoding them with pyroute2 took 0.73 s (and ~5 s under TCG).
    with entered(netns):
        try:
            return {name for _, name in socket.if_nameindex()}
        except OSError as exc:
            raise KernelError("list links", exc.strerror or str(exc), exc.errno) from exc


def bridge_ports(bridge_name: str, netns: str | None = None) -> list[str]:
    """Names of the ports enslaved to ``bridge_name``, sorted; KernelError(ENODEV) if absent."""
    with NetlinkSocket(socket.NETLINK_ROUTE, netns, operation="list bridge ports") as nl:
        bridge = get_link(nl, name=bridge_name)
        if bridge is None:
            raise KernelError("list bridge ports", f"no device {bridge_name!r}", errno.ENODEV)
        if bridge.kind != "bridge":
            raise KernelError("list bridge ports", f"{bridge_name!r} is not a bridge", errno.EINVAL)
        return sorted(port.name for port in ports_of(nl, bridge.ifindex))
