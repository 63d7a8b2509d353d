"""The real ports of the invalidation service (``kernel/ports.InvalidationPorts``).

:func:`open_ports` opens one namespace's sockets: the rtnetlink watcher and the
conntrack subscription (not yet subscribed: the service calls ``open()`` on them,
in its start-up order), a conntrack request socket, a conntrack dump stream, a
route-lookup socket, and the wake-up pipe the service's ``select`` watches.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from collections.abc import Collection, Iterable, Sequence

from controlplane.config import InvalidationConfig
from controlplane.core.flowpath import Route
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket, DumpStream
from controlplane.kernel.ctnetlink.events import CtEvents
from controlplane.kernel.ctnetlink.lookup import CtLookup
from controlplane.kernel.netlink import NetlinkSocket
from controlplane.kernel.ports import InvalidationPorts
from controlplane.kernel.rtnl.topology import lookup_routes_on
from controlplane.kernel.rtnl.watcher import Watcher

__all__ = ["CT_MIN_RCVBUF", "PipeWaiter", "RouteLookup", "open_ports"]

# Our own teardowns echo two conntrack events per flow (DESTROY, then NEW of the
# re-created entry): a buffer smaller than that echo would turn every teardown
# into a full re-dump, so it never goes below CT_MIN_RCVBUF whatever
# rcvbuf_bytes (sized for rtnetlink bursts) says.
CT_MIN_RCVBUF = 32 << 20


class RouteLookup:
    """RTM_GETROUTE per address over one kept NETLINK_ROUTE socket (opening a socket
    in a namespace costs more than a lookup)."""

    def __init__(self, netns: str | None) -> None:
        self._nl = NetlinkSocket(socket.NETLINK_ROUTE, netns, operation="route lookup")

    def lookup(self, addresses: Iterable[str]) -> dict[str, Route | None]:
        return lookup_routes_on(self._nl, addresses)

    def close(self) -> None:
        self._nl.close()


class PipeWaiter:
    """``select`` over the caller's descriptors plus a non-blocking wake-up pipe."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def wait(self, fds: Sequence[int], timeout: float | None) -> Collection[int]:
        readable, _, _ = select.select([*fds, self._r], [], [], timeout)
        if self._r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._r, 4096)
        return readable

    def wake(self) -> None:
        if self._w >= 0:
            with contextlib.suppress(OSError):  # full pipe: a wake-up is pending anyway
                os.write(self._w, b"\0")

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1


def open_ports(netns: str | None, settings: InvalidationConfig) -> InvalidationPorts:
    """One namespace's invalidation ports; whatever opened is closed again if a later
    one fails (an unknown namespace, no permission: KernelError / EnvironmentProblem)."""
    with contextlib.ExitStack() as undo:
        waiter = PipeWaiter()
        undo.callback(waiter.close)
        conntrack = ConntrackSocket(netns)
        undo.callback(conntrack.close)
        dump = DumpStream(netns)
        undo.callback(dump.close)
        routes = RouteLookup(netns)
        undo.callback(routes.close)
        ports = InvalidationPorts(
            rtnl=Watcher(netns, sources=settings.watch, rcvbuf=settings.rcvbuf_bytes),
            changes=CtEvents(netns, rcvbuf=max(settings.rcvbuf_bytes, CT_MIN_RCVBUF), updates=True),
            conntrack=conntrack,
            dump=dump,
            routes=routes,
            waiter=waiter,
            lookup=CtLookup(netns),
        )
        undo.pop_all()
    return ports
