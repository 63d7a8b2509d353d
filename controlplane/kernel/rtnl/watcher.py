"""Watch one network namespace's links, bridge FDB, neighbours and routes.

The watcher turns rtnetlink notifications into the frozen events of
:mod:`controlplane.core.events`, one per message, as upserts (a MAC move is ONE
RTM_NEWNEIGH with a new port and no delete, docs/netlink.md). It decodes and
translates; it keeps no cache: the engine's caches (``core/invalidation.py``) are
the one topology cache, and the engine drops repeats and detects moves.

Events and the dumps (:meth:`Watcher.snapshot`) are decoded by the one rtnetlink
codec (:mod:`.codec`; why not pyroute2's ``IPRoute``: docs/netlink.md).

Losing events is expected and handled: on ENOBUFS the watcher drains the socket
to EAGAIN and reports :class:`~controlplane.core.events.EventsLost`; the engine
answers ``Resync`` and the service hands it a fresh :meth:`Watcher.snapshot`,
which the engine diffs against its caches (every difference handled as the event
that was lost). A lost socket is reopened and reported the same way.

The watcher never tears anything down itself: it reports.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from controlplane.core import events as ev
from controlplane.core.flowpath import Topology
from controlplane.errors import KernelError
from controlplane.kernel.netlink import (
    NetlinkSocket,
    Subscription,
    drain,
    messages,
)
from controlplane.kernel.rtnl import topology
from controlplane.kernel.rtnl.codec import (
    SOURCE_GROUPS,
    Decoded,
    FdbMsg,
    LinkMsg,
    NeighMsg,
    decode,
)

__all__ = ["Watcher", "WatcherStats", "translate"]


def translate(change: Decoded) -> ev.Event:
    """The event one decoded message means (an upsert; the engine drops repeats)."""
    if isinstance(change, FdbMsg):
        bridge, vlan, mac = change.key
        if change.port is None:
            return ev.FdbEntryRemoved(bridge=bridge, vlan=vlan, mac=mac)
        return ev.FdbEntryChanged(bridge=bridge, vlan=vlan, mac=mac, port=change.port)
    if isinstance(change, NeighMsg):
        ifindex, ip = change.key
        if change.mac is None:
            return ev.NeighbourRemoved(ifindex=ifindex, ip=ip)
        return ev.NeighbourChanged(ifindex=ifindex, ip=ip, mac=change.mac)
    if isinstance(change, LinkMsg):
        if change.link is None:
            return ev.LinkRemoved(ifindex=change.ifindex)
        return ev.LinkChanged(link=change.link)
    return ev.RouteChanged(prefix=change.key[2])


@dataclass
class WatcherStats:
    messages: int = 0  # notifications decoded
    events: int = 0  # events emitted
    overflows: int = 0  # ENOBUFS seen
    snapshots: int = 0  # dumps taken (start-up, resync, reconcile)
    socket_errors: int = 0
    last_snapshot_seconds: float = 0.0


class Watcher(Subscription):
    """One namespace's rtnetlink watcher: explicit :meth:`open`, :meth:`poll`,
    :meth:`snapshot`, :meth:`close`; no threads, no timers (the caller owns those).
    Implements :class:`controlplane.kernel.ports.RtnlEventsPort`.

    ``sources``: any of ``link``, ``fdb``, ``neigh``, ``route``. Link events are
    always decoded (names and bridge membership give the other events meaning).
    """

    operation = "watch rtnetlink"

    def __init__(
        self,
        netns: str | None = None,
        *,
        sources: Iterable[str] = ("link", "fdb", "neigh", "route"),
        rcvbuf: int = 32 << 20,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.netns = netns
        self.sources = frozenset(sources) | {"link"}
        unknown = self.sources - SOURCE_GROUPS.keys()
        if unknown:
            raise ValueError(f"unknown watch source(s): {sorted(unknown)}")
        self.rcvbuf = rcvbuf
        # RTNLGRP_NEIGH carries FDB and ARP/NDP alike: drop the unwatched half.
        self._ignored: frozenset[type] = frozenset(
            kind
            for source, kind in (("fdb", FdbMsg), ("neigh", NeighMsg))
            if source not in self.sources
        )
        # What a snapshot dumps: the tables behind the cached topology (routes are
        # looked up per address, never cached).
        self._dumped = self.sources & {"link", "fdb", "neigh"}
        self.stats = WatcherStats()
        self._clock = clock

    # -- life cycle -------------------------------------------------------
    def open(self) -> None:
        """Subscribe. The caller dumps next (:meth:`snapshot`): an event racing the
        dump is applied after it as an idempotent upsert, so nothing falls between."""
        groups = {g for s in self.sources for g in SOURCE_GROUPS[s]}
        mask = 0
        for group in groups:
            mask |= 1 << (group - 1)
        self._subscribe(socket.NETLINK_ROUTE, self.netns, mask, self.rcvbuf)

    # -- reading ------------------------------------------------------------
    def poll(self, limit: int = 65_536) -> list[ev.Event]:
        """Read what the kernel has queued (never blocks), at most ``limit``
        datagrams; decode and return the events.

        What is left stays in the socket's receive buffer (the bounded queue); if
        that overflows, the socket is drained and ``EventsLost`` reported.
        """
        nl = self.opened()
        out: list[ev.Event] = []
        ignored = self._ignored
        try:
            for buf in nl.queued(limit):
                if buf is None:
                    # What is queued is a mix from before and after the overflow:
                    # the snapshot the engine asks for supersedes it.
                    self.stats.overflows += 1
                    drain(nl.sock)
                    out.append(ev.EventsLost(source="rtnl"))
                    break
                for kind, _flags, _seq, start, end in messages(buf):
                    change = decode(kind, buf, start, end)
                    if change is None or type(change) in ignored:
                        continue
                    self.stats.messages += 1
                    out.append(translate(change))
        except KernelError as exc:
            out += self._socket_lost(exc)
        self.stats.events += len(out)
        return out

    def _socket_lost(self, exc: KernelError) -> list[ev.Event]:
        """Report and reopen: never die silently, never guess (the engine's resync
        dumps what was missed)."""
        self.stats.socket_errors += 1
        self.close()
        self.open()  # raises KernelError if the namespace is gone: reported by the caller
        return [ev.EventsLost(source="rtnl")]

    def snapshot(self, *, lost: bool = True) -> ev.Snapshot:
        """A fresh dump of links, neighbours and FDB (the watched ones) as the engine's
        ``Snapshot`` (start-up, ``Resync(source="rtnl")``, a periodic reconcile)."""
        t0 = self._clock()
        with NetlinkSocket(
            socket.NETLINK_ROUTE, self.netns, rcvbuf=4 << 20, operation="rtnetlink dump"
        ) as nl:
            caches = topology.dump(nl, self._dumped)
        self.stats.snapshots += 1
        self.stats.last_snapshot_seconds = self._clock() - t0
        dumped = Topology(links=caches.links, neighbours=caches.neighbours, fdb=caches.fdb)
        return ev.Snapshot(topology=dumped, lost=lost)
