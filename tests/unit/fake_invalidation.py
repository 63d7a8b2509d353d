"""A faithful in-memory kernel for the invalidation service's ports (``InvalidationPorts``).

One :class:`FakeKernel` holds a namespace's topology and conntrack table; its ports
(:meth:`FakeKernel.ports`) satisfy the same Protocols as the real adapters
(``kernel/ports.py``) and fail where the kernel fails, with the production
:class:`KernelError` and the kernel's errno:

- a socket used after ``close`` (or before ``open``): EBADF;
- notifications reach a subscription only once it is open, and only those after it
  (as the kernel's multicast groups); past ``capacity`` queued datagrams the queue
  overflows: the watcher reports ``EventsLost`` after draining, the conntrack
  subscription says ``lost`` (ENOBUFS / the socket's drop counter);
- a conntrack delete of an entry that is gone or has another id is ENOENT (counted
  as already gone), a re-create of an entry that exists is EEXIST (counted as made by
  traffic); both echo DESTROY / NEW to a subscription, as the kernel does;
- setting IPS_OFFLOAD sends no event (:meth:`FakeKernel.offload`), as the kernel's.

Tests change the world "by hand" through the kernel (``move``, ``link``, ``end``...):
each change is announced as the kernel would announce it, unless ``silent``.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace

from controlplane.config import InvalidationConfig
from controlplane.core import events as ev
from controlplane.core.flowpath import IPS_OFFLOAD, Flow, Link, Route, Topology
from controlplane.errors import KernelError
from controlplane.kernel.ports import InvalidationPorts
from tests.unit.test_invalidation import World

_Key = tuple[int, object]


@dataclass(frozen=True, slots=True)
class FakeChange:
    flow: Flow
    gone: bool
    new: bool = False


@dataclass(frozen=True, slots=True)
class FakeDeleted:
    deleted: int
    already_gone: int


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class _Socket:
    """Open/closed state and a descriptor number, as a socket has."""

    def __init__(self, kernel: FakeKernel, operation: str, *, opened: bool = False) -> None:
        self.kernel = kernel
        self.operation = operation
        self.fd = -1
        if opened:
            self._open()

    def _open(self) -> None:
        self.fd = next(self.kernel.fds)
        self.kernel.sockets[self.fd] = self

    def _check(self) -> None:
        if self.fd < 0:
            raise KernelError(self.operation, "Bad file descriptor", errno.EBADF)

    def fileno(self) -> int:
        self._check()
        return self.fd

    def close(self) -> None:
        self.kernel.sockets.pop(self.fd, None)
        self.fd = -1

    def readable(self) -> bool:
        return False


class FakeRtnl(_Socket):
    """``RtnlEventsPort``: rtnetlink notifications decoded into events, no cache."""

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__(kernel, "watch rtnetlink")
        self.queue: list[ev.Event] = []
        self.overflowed = False
        self.snapshots = 0

    def open(self) -> None:
        self._open()
        self.queue, self.overflowed = [], False

    def readable(self) -> bool:
        return bool(self.queue) or self.overflowed

    def poll(self, limit: int) -> list[ev.Event]:
        self._check()
        if self.kernel.fail_poll is not None:
            code, self.kernel.fail_poll = self.kernel.fail_poll, None
            raise KernelError("watch rtnetlink", "socket lost", code)
        if self.overflowed:  # drained: what was queued is superseded by the resync
            self.queue, self.overflowed = [], False
            return [ev.EventsLost(source="rtnl")]
        out, self.queue = self.queue[:limit], self.queue[limit:]
        return out

    def snapshot(self, *, lost: bool = True) -> ev.Snapshot:
        self.snapshots += 1
        w = self.kernel.world
        topology = Topology(links=dict(w.links), neighbours=dict(w.neighbours), fdb=dict(w.fdb))
        return ev.Snapshot(topology=topology, lost=lost)

    def deliver(self, event: ev.Event) -> None:
        if self.fd < 0 or self.overflowed:
            return
        if len(self.queue) >= self.kernel.capacity:
            self.overflowed = True  # ENOBUFS
            return
        self.queue.append(event)


class FakeCtEvents(_Socket):
    """``CtChangesPort``: conntrack NEW/UPDATE/DESTROY of TCP and UDP entries."""

    protocols = frozenset({6, 17})

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__(kernel, "watch conntrack")
        self.queue: list[FakeChange] = []
        self.lost = False
        self.dumps = 0

    def open(self) -> None:
        self._open()
        self.queue, self.lost = [], False

    def readable(self) -> bool:
        return bool(self.queue) or self.lost

    def poll(self, limit: int = 65_536) -> tuple[Sequence[FakeChange], bool]:
        self._check()
        out, self.queue = self.queue[:limit], self.queue[limit:]
        lost, self.lost = self.lost, False
        if lost:
            self.queue = []
        return out, lost

    def dump(self) -> list[Flow]:
        flows: list[Flow] = []
        self.dump_each(flows.append)
        return flows

    def dump_each(self, on_flow: Callable[[Flow], None]) -> None:
        self.dumps += 1
        for flow in list(self.kernel.conntrack.values()):
            if flow.orig.proto in self.protocols:
                on_flow(flow)

    def deliver(self, change: FakeChange) -> None:
        if self.fd < 0 or self.lost or change.flow.orig.proto not in self.protocols:
            return
        if len(self.queue) >= self.kernel.capacity:
            self.lost = True  # the socket's drop counter moved
            return
        self.queue.append(change)


class FakeConntrack(_Socket):
    """``CtRequestPort``: CT_GET, CT_DELETE, CT_NEW on the fake table."""

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__(kernel, "conntrack", opened=True)
        self.last_deleted: list[Flow] = []
        self.asked: list[list[Flow]] = []  # each statuses() batch, in order

    def statuses(self, flows: Iterable[Flow]) -> list[tuple[Flow, int | None]]:
        self._check()
        batch = list(flows)
        self.asked.append(batch)
        table = self.kernel.conntrack
        return [(f, e.status if (e := table.get((f.zone, f.orig))) else None) for f in batch]

    def delete(self, flows: Iterable[Flow]) -> FakeDeleted:
        self._check()
        done: list[Flow] = []
        gone = 0
        for flow in flows:
            entry = self.kernel.conntrack.get((flow.zone, flow.orig))
            if entry is None or entry.id != flow.id:
                gone += 1  # ENOENT
                continue
            self.kernel.end(entry)
            done.append(flow)
        self.last_deleted = done
        return FakeDeleted(len(done), gone)

    def reinject(self, flows: Iterable[Flow]) -> tuple[int, int]:
        self._check()
        created = exists = 0
        for flow in flows:
            if (flow.zone, flow.orig) in self.kernel.conntrack:
                exists += 1  # EEXIST: a packet made it first
                continue
            self.kernel.add(replace(flow, status=flow.status & ~IPS_OFFLOAD))
            created += 1
        return created, exists


class FakeDump(_Socket):
    """``CtDumpPort``: a dump of the table as it is at ``begin``, read in steps."""

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__(kernel, "conntrack dump", opened=True)
        self.pending: list[Flow] | None = None
        self.fail: int | None = None  # errno the next read fails with

    def readable(self) -> bool:
        return self.pending is not None

    def begin(self) -> None:
        self._check()
        self.pending = list(self.kernel.conntrack.values())

    def read(self, budget: int) -> tuple[list[Flow], bool]:
        self._check()
        if self.pending is None:
            return [], False
        if self.fail is not None:
            code, self.fail, self.pending = self.fail, None, None
            raise KernelError("conntrack dump", "dump failed", code)
        out, self.pending = self.pending[:budget], self.pending[budget:]
        if not self.pending:
            self.pending = None
            return out, True
        return out, False


class FakeRoutes(_Socket):
    """``RouteLookupPort``: the world's longest-prefix match."""

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__(kernel, "route lookup", opened=True)
        self.asked: list[str] = []

    def lookup(self, addresses: Iterable[str]) -> dict[str, Route | None]:
        self._check()
        wanted = sorted(set(addresses))
        self.asked += wanted
        return {a: self.kernel.world.lookup(a) for a in wanted}


class FakeWaiter(_Socket):
    """``WaitPort``: readable = a fake socket with something queued; waiting with
    nothing readable lets the fake clock run to the timeout (a real sleep)."""

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__(kernel, "wait", opened=True)
        self.woken = False

    def readable(self) -> bool:
        return self.woken

    def wait(self, fds: Sequence[int], timeout: float | None) -> Collection[int]:
        self._check()
        for fd in fds:
            if fd not in self.kernel.sockets:
                raise KernelError("select", "Bad file descriptor", errno.EBADF)
        ready = {fd for fd in [*fds, self.fd] if self.kernel.sockets[fd].readable()}
        self.woken = False
        if not ready:
            if timeout is None:
                raise AssertionError("a wait without timeout and nothing to wake it: a hang")
            self.kernel.clock.now += timeout
        return ready

    def wake(self) -> None:
        if self.fd >= 0:
            self.woken = True


@dataclass
class FakeKernel:
    """One namespace: its topology (a ``World``), conntrack table and sockets."""

    world: World
    clock: FakeClock = field(default_factory=FakeClock)
    capacity: int = 10_000  # queued notifications per subscription before an overflow
    conntrack: dict[_Key, Flow] = field(default_factory=dict)
    sockets: dict[int, _Socket] = field(default_factory=dict)
    fds: itertools.count[int] = field(default_factory=lambda: itertools.count(100))
    fail_poll: int | None = None  # errno the watcher's next poll fails with
    opened: list[InvalidationPorts] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(50_000))

    def ports(self, netns: str | None, settings: InvalidationConfig) -> InvalidationPorts:
        """The factory the service takes (``ports=kernel.ports``)."""
        ports = InvalidationPorts(
            rtnl=FakeRtnl(self),
            changes=FakeCtEvents(self),
            conntrack=FakeConntrack(self),
            dump=FakeDump(self),
            routes=FakeRoutes(self),
            waiter=FakeWaiter(self),
        )
        self.opened.append(ports)
        return ports

    @property
    def last(self) -> InvalidationPorts:
        return self.opened[-1]

    # -- conntrack, as traffic and the kernel change it ---------------------------------

    def add(self, flow: Flow, *, silent: bool = False) -> Flow:
        """A new entry (a new id unless ``flow`` has one nobody uses); NEW unless silent."""
        if any(e.id == flow.id for e in self.conntrack.values()):
            flow = replace(flow, id=next(self._ids))
        self.conntrack[(flow.zone, flow.orig)] = flow
        if not silent:
            self._ct(FakeChange(flow, gone=False, new=True))
        return flow

    def offload(self, flow: Flow) -> Flow:
        """The kernel offloads the entry: IPS_OFFLOAD set, no event."""
        key = (flow.zone, flow.orig)
        entry = self.conntrack[key] = replace(
            self.conntrack[key], status=self.conntrack[key].status | IPS_OFFLOAD
        )
        return entry

    def end(self, flow: Flow, *, silent: bool = False) -> None:
        entry = self.conntrack.pop((flow.zone, flow.orig))
        if not silent:
            self._ct(FakeChange(entry, gone=True))

    def entry(self, flow: Flow) -> Flow | None:
        return self.conntrack.get((flow.zone, flow.orig))

    # -- topology -------------------------------------------------------------------------

    def change(self, event: ev.Event, *, silent: bool = False) -> None:
        """Apply a topology change the way the kernel would announce it (``event``)."""
        self.world.apply(event)
        if not silent:
            for ports in self.opened:
                rtnl = ports.rtnl
                assert isinstance(rtnl, FakeRtnl)
                rtnl.deliver(event)

    def link(self, link: Link) -> None:
        self.change(ev.LinkChanged(link=link))

    def _ct(self, change: FakeChange) -> None:
        for ports in self.opened:
            changes = ports.changes
            assert isinstance(changes, FakeCtEvents)
            changes.deliver(change)
