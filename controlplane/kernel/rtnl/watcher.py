"""Watch one network namespace's links, bridge FDB, neighbours and routes.

The watcher turns rtnetlink notifications into the frozen events of
:mod:`controlplane.core.events` and keeps the caches that give them meaning:
``(bridge, vlan, mac) → port`` (a MAC move is ONE RTM_NEWNEIGH with a new
port and no delete, docs/netlink.md), ``(ifindex, ip) → mac``, links and routes.

Events and the dumps that rebuild the caches are decoded by the one rtnetlink
codec (:mod:`.codec`; why not pyroute2's ``IPRoute``: docs/netlink.md).

Losing events is expected and handled: on ENOBUFS the watcher drains the
socket to EAGAIN, dumps the tables again, diffs the dump against its caches
and emits exactly the changes it missed (plus an :class:`EventsLost`
marker), so no invalidation is ever missed. A periodic
:meth:`Watcher.reconcile` does the same without an overflow, for moves the
kernel never announces (hardware-learned entries, extern_learn).

The watcher never tears anything down itself: it reports.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

from controlplane.core import events as ev
from controlplane.errors import KernelError
from controlplane.kernel.netlink import (
    NetlinkSocket,
    drain,
    messages,
)
from controlplane.kernel.rtnl import topology
from controlplane.kernel.rtnl.codec import (
    SOURCE_GROUPS,
    Caches,
    Decoded,
    FdbMsg,
    LinkMsg,
    NeighMsg,
    RouteMsg,
    decode,
)

__all__ = ["Watcher", "WatcherStats", "apply", "diff"]

# -- caches + change → events ---------------------------------------------------------


def apply(caches: Caches, change: Decoded) -> list[ev.Event]:
    """Upsert ``change`` into ``caches``; the events it means (none if nothing changed).

    Events are upserts (core/events.py): the engine detects a move from an
    ``FdbEntryChanged`` whose port differs from the one it knew. The cache here
    only keeps repeats (the kernel re-announces refreshed entries) away from it.
    """
    if isinstance(change, FdbMsg):
        old = caches.fdb.get(change.key)
        if old == change.port:
            return []
        bridge, vlan, mac = change.key
        if change.port is None:
            del caches.fdb[change.key]
            return [ev.FdbEntryRemoved(bridge=bridge, vlan=vlan, mac=mac)]
        caches.fdb[change.key] = change.port
        return [ev.FdbEntryChanged(bridge=bridge, vlan=vlan, mac=mac, port=change.port)]
    if isinstance(change, NeighMsg):
        old_mac = caches.neighbours.get(change.key)
        if old_mac == change.mac:
            return []
        ifindex, ip = change.key
        if change.mac is None:
            del caches.neighbours[change.key]
            return [ev.NeighbourRemoved(ifindex=ifindex, ip=ip)]
        caches.neighbours[change.key] = change.mac
        return [ev.NeighbourChanged(ifindex=ifindex, ip=ip, mac=change.mac)]
    if isinstance(change, LinkMsg):
        old_link = caches.links.get(change.ifindex)
        if change.link is None:
            if old_link is None:
                return []
            del caches.links[change.ifindex]
            _forget_device(caches, change.ifindex)
            return [ev.LinkRemoved(ifindex=change.ifindex)]
        if old_link == change.link:
            return []
        caches.links[change.ifindex] = change.link
        return [ev.LinkChanged(link=change.link)]
    old_route = caches.routes.get(change.key)
    if old_route == change.state:
        return []
    if change.state is None:
        del caches.routes[change.key]
    else:
        caches.routes[change.key] = change.state
    return [ev.RouteChanged(prefix=change.key[2])]


def _forget_device(caches: Caches, ifindex: int) -> None:
    # The kernel flushes FDB and neighbour entries of an unregistered device
    # without a notification per entry: mirror it.
    for key in [k for k, port in caches.fdb.items() if port == ifindex or k[0] == ifindex]:
        del caches.fdb[key]
    for nkey in [k for k in caches.neighbours if k[0] == ifindex]:
        del caches.neighbours[nkey]


def diff(old: Caches, new: Caches) -> list[ev.Event]:
    """Events that turn ``old`` into ``new`` (what a lost stretch of notifications said).

    ``old`` is updated in place to equal ``new``, through the same :func:`apply`
    the live events go through, so a resync and a live stream mean the same.
    Removals of links first (they take their FDB/neighbour entries along),
    then upserts, then the other removals.
    """
    changes: list[Decoded] = [LinkMsg(i, None) for i in old.links.keys() - new.links.keys()]
    changes += [LinkMsg(i, link) for i, link in new.links.items() if old.links.get(i) != link]
    changes += [FdbMsg(k, p) for k, p in new.fdb.items() if old.fdb.get(k) != p]
    changes += [FdbMsg(k, None) for k in old.fdb.keys() - new.fdb.keys()]
    changes += [NeighMsg(k, m) for k, m in new.neighbours.items() if old.neighbours.get(k) != m]
    changes += [NeighMsg(k, None) for k in old.neighbours.keys() - new.neighbours.keys()]
    changes += [RouteMsg(k, r) for k, r in new.routes.items() if old.routes.get(k) != r]
    changes += [RouteMsg(k, None) for k in old.routes.keys() - new.routes.keys()]
    out: list[ev.Event] = []
    for change in changes:
        out += apply(old, change)
    return out


@dataclass
class WatcherStats:
    messages: int = 0  # notifications decoded
    events: int = 0  # events emitted (live + resync)
    overflows: int = 0  # ENOBUFS seen
    resyncs: int = 0  # dumps diffed against the caches (overflow, reconcile, socket loss)
    resync_events: int = 0  # events found only by a resync
    socket_errors: int = 0
    last_resync_seconds: float = 0.0


class Watcher:
    """One namespace's rtnetlink watcher: explicit :meth:`open`, :meth:`poll`,
    :meth:`reconcile`, :meth:`close`; no threads, no timers (the caller owns those).

    ``sources``: any of ``link``, ``fdb``, ``neigh``, ``route``. Link events are
    always decoded (names and bridge membership give the other events meaning).
    """

    def __init__(
        self,
        netns: str | None = None,
        *,
        sources: Iterable[str] = ("link", "fdb", "neigh", "route"),
        rcvbuf: int = 32 << 20,
        clock: Callable[[], float] | None = None,
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
        self.caches = Caches()
        self.stats = WatcherStats()
        self._events: NetlinkSocket | None = None
        self._clock = clock

    # -- life cycle -------------------------------------------------------
    def open(self) -> None:
        """Subscribe, then dump: an event racing the dump is applied after it as an
        idempotent upsert, so nothing falls between the two."""
        groups = {g for s in self.sources for g in SOURCE_GROUPS[s]}
        mask = 0
        for group in groups:
            mask |= 1 << (group - 1)
        self._events = NetlinkSocket(
            socket.NETLINK_ROUTE,
            self.netns,
            groups=mask,
            rcvbuf=self.rcvbuf,
            operation="watch rtnetlink",
            nonblocking=True,
        )
        self.caches = self._dump()

    def close(self) -> None:
        if self._events is not None:
            # the descriptor may already be gone (that may be why we close)
            with contextlib.suppress(OSError):
                self._events.close()
            self._events = None

    def __enter__(self) -> Watcher:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def fileno(self) -> int:
        if self._events is None:
            raise KernelError("watch rtnetlink", "watcher is not open", errno.EBADF)
        return self._events.fileno()

    # -- reading ------------------------------------------------------------
    def poll(self, limit: int = 65_536) -> list[ev.Event]:
        """Read what the kernel has queued (never blocks), at most ``limit``
        datagrams; decode, update the caches, return the events.

        What is left stays in the socket's receive buffer (the bounded queue);
        if that overflows, the next poll resyncs.
        """
        if self._events is None:
            raise KernelError("watch rtnetlink", "watcher is not open", errno.EBADF)
        events = self._events
        out: list[ev.Event] = []
        caches = self.caches
        for _ in range(limit):
            try:
                buf = events.recv_raw()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.stats.overflows += 1
                    out += self.resync(reason="overflow", drain_first=True)
                    continue
                out += self._socket_lost(exc)
                break
            for kind, _flags, _seq, start, end in messages(buf):
                change = decode(kind, buf, start, end)
                if change is None or type(change) in self._ignored:
                    continue
                self.stats.messages += 1
                out += apply(caches, change)
        self.stats.events += len(out)
        return out

    def _socket_lost(self, exc: OSError) -> list[ev.Event]:
        """Report, reopen, resync: never die silently, never guess."""
        self.stats.socket_errors += 1
        self.close()
        lost: list[ev.Event] = [ev.EventsLost(source="rtnl")]
        old = self.caches
        self.open()  # raises KernelError if the namespace is gone: reported by the caller
        new, self.caches = self.caches, old
        found = diff(self.caches, new)
        self.stats.resyncs += 1
        self.stats.resync_events += len(found)
        return lost + found

    def resync(self, *, reason: str, drain_first: bool = False) -> list[ev.Event]:
        """Dump the tables and emit what differs from the caches.

        ``drain_first`` (after ENOBUFS): what is queued is a mix from before
        and after the overflow; the dump supersedes it.
        """
        if drain_first and self._events is not None:
            drain(self._events.sock)
        t0 = time.perf_counter()
        new = self._dump()
        found = diff(self.caches, new)
        self.stats.resyncs += 1
        self.stats.resync_events += len(found)
        self.stats.last_resync_seconds = time.perf_counter() - t0
        return [ev.EventsLost(source="rtnl"), *found] if drain_first else found

    def snapshot(self) -> ev.Snapshot:
        """The caches as the engine's ``Snapshot`` (answers ``Resync(source="rtnl")``;
        :meth:`resync` has just refreshed them from a dump)."""
        return ev.Snapshot(topology=self.caches.topology())

    def reconcile(self) -> list[ev.Event]:
        """Periodic FDB/neighbour check for changes the kernel never announced."""
        out = self.resync(reason="reconcile")
        self.stats.events += len(out)
        return out

    # -- dumps ------------------------------------------------------------------
    def _dump(self) -> Caches:
        with NetlinkSocket(
            socket.NETLINK_ROUTE, self.netns, rcvbuf=4 << 20, operation="rtnetlink dump"
        ) as nl:
            return topology.dump(nl, {"link", *self.sources})
