"""The invalidation loop: kernel events in, the engine's decisions out, stale flows torn down.

One :class:`InvalidationService` per network namespace: a pump over injected
ports (``kernel/ports.py``, :class:`~controlplane.kernel.ports.InvalidationPorts`;
the real ones from ``kernel/invalidation.py``, in-memory fakes in unit tests). It
carries events to the pure engine (``core/invalidation.py``) and its actions to
the ports; the decisions around the engine are pure as well: which entries count
as offloaded and in what order teardowns check them (``core/flowbook.py``), when
reconcile, prune and next-hop waits are due (``core/schedule.py``), what a prune
decides (``core/flowindex.PruneRound``). Explicit
:meth:`~InvalidationService.start` / :meth:`~InvalidationService.step` /
:meth:`~InvalidationService.stop`, no threads, no globals: ``offloadctl watch``
runs it in the foreground and the agent embeds it in its own loop (``fds()`` +
``step(timeout=0)``).

Bounded: the queues are the kernels' socket buffers (``rcvbuf_bytes``); each
step takes at most ``queue_size`` datagrams from each socket. What does not
fit stays in the kernel; if a buffer overflows, the watcher (or the
conntrack subscription) reports ``EventsLost`` and the engine asks for a
resync: never silent loss.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from controlplane.config import InvalidationConfig
from controlplane.core import events as ev
from controlplane.core.flowbook import FlowBook
from controlplane.core.flowindex import FlowIndex, PruneRound
from controlplane.core.flowpath import Flow, Topology
from controlplane.core.schedule import NEXT_HOP_WAIT, PRUNE_STEP_ENTRIES, Schedule
from controlplane.core.startup import next_hops
from controlplane.errors import KernelError
from controlplane.service.startup import index_while_watching

if TYPE_CHECKING:
    from controlplane.kernel.ports import InvalidationPorts

__all__ = [
    "NEXT_HOP_WAIT",
    "Engine",
    "InvalidationService",
    "OpenPorts",
    "ServiceStats",
    "default_engine",
]

Report = Callable[[dict[str, Any]], None]
OpenPorts = Callable[[str | None, InvalidationConfig], "InvalidationPorts"]
# Route answers can mark more flows stale: flush until the engine is quiet, at most
# this many rounds (each resolves only addresses not yet answered).
_FLUSH_ROUNDS = 8


class Engine(Protocol):
    """What the loop needs of ``core/invalidation``: events in, actions out."""

    def handle(self, event: ev.Event) -> Sequence[ev.Action]: ...

    def flush(self) -> Sequence[ev.Action]: ...

    def __len__(self) -> int: ...

    @property
    def index(self) -> FlowIndex:
        """The flow index (a prune diffs it against a dump)."""
        ...

    def name(self, ifindex: int) -> str:
        """A device's name as the engine's link cache has it."""
        ...

    @property
    def caches(self) -> Topology:
        """The engine's topology caches, to read (the start-up gate)."""
        ...


@dataclass
class ServiceStats:
    events: int = 0
    events_lost: int = 0  # EventsLost seen (socket overflows, lost sockets)
    teardowns: int = 0  # kernel batches
    flows_torn_down: int = 0
    already_gone: int = 0
    recreated: int = 0
    resyncs: int = 0
    reconciles: int = 0
    prunes: int = 0  # completed rounds
    prunes_abandoned: int = 0  # rounds a resync superseded or that outgrew their bound
    pruned: int = 0  # indexed flows dropped: their entry was gone
    prune_added: int = 0  # offloaded entries whose NEW was missed
    prune_changed: int = 0  # indexed flows replaced: new conntrack id, mark or reply
    last_prune_seconds: float = 0.0  # wall time of the last round, dump start to finish
    last_prune_step: float = 0.0  # its longest step: how long it held up events
    not_offloaded: int = 0  # flows judged stale whose entry was not offloaded: left alone
    last_event_to_deleted: float = 0.0  # seconds from select() waking to deletes ACKed
    last_event_to_teardown: float = 0.0  # ... to deletes and re-creates ACKed
    errors: int = 0


def default_engine() -> Engine:
    from controlplane.core.invalidation import Engine as InvalidationEngine
    from controlplane.core.invalidation import Policy

    return InvalidationEngine(Policy())


def _real_ports(netns: str | None, settings: InvalidationConfig) -> InvalidationPorts:
    from controlplane.kernel.invalidation import open_ports

    return open_ports(netns, settings)


# Event fields that hold an ifindex: reported by name, the index as an extra field.
_DEVICE_FIELDS = frozenset({"bridge", "port", "ifindex"})


def _describe(item: object, name_of: Callable[[int], str]) -> dict[str, Any]:
    """An event's fields for ``offloadctl watch`` (devices by name)."""
    record: dict[str, Any] = {}
    for name in getattr(item, "__dataclass_fields__", {}):
        value = getattr(item, name)
        if name in _DEVICE_FIELDS and isinstance(value, int):
            key = "dev" if name == "ifindex" else name
            record[key] = name_of(value)
            record[f"{key}_ifindex"] = value
        elif name == "flows":
            record["flows"] = len(value)
        elif name == "causes":
            record["causes"] = sorted(set(value))
        elif name == "topology":
            record["links"] = len(value.links)
            record["fdb"] = len(value.fdb)
            record["neighbours"] = len(value.neighbours)
        elif name in ("routes", "addresses"):
            record[name] = len(value)
        elif name == "link":
            record |= {"dev": value.name, "dev_ifindex": value.ifindex, "up": value.up}
            if value.master is not None:
                record |= {"master": name_of(value.master), "master_ifindex": value.master}
        elif name == "flow":
            o = value.orig
            record["flow"] = f"{o.proto} {o.src}:{o.sport}->{o.dst}:{o.dport} zone={value.zone}"
        else:
            record[name] = value
    return record


class InvalidationService:
    """Watcher + conntrack events + engine + teardown for one namespace.

    ``dry_run``: decisions are reported, nothing is deleted. ``only_offloaded``
    False is the test-only switch (``OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED``,
    ``core/flowbook.py``). ``report`` receives one record per event and per
    decision (``offloadctl watch`` prints them); ``None`` reports nothing.
    ``on_topology`` receives the engine's ``TopologyChanged`` notices (the agent
    re-plans the flowtable devices from them). ``ports`` opens the kernel ports
    at :meth:`start` (default: the real ones, ``kernel/invalidation.py``).
    """

    def __init__(
        self,
        netns: str | None,
        settings: InvalidationConfig,
        *,
        dry_run: bool = False,
        only_offloaded: bool = True,
        report: Report | None = None,
        engine: Engine | None = None,
        clock: Callable[[], float] = time.monotonic,
        report_events: bool = True,
        freeze_gc: bool = True,
        ports: OpenPorts | None = None,
        on_topology: Callable[[ev.TopologyChanged], None] | None = None,
    ) -> None:
        self.netns = netns
        self.settings = settings
        self.dry_run = dry_run
        self.only_offloaded = only_offloaded
        self.freeze_gc = freeze_gc
        self._report = report
        self._report_events = report_events and report is not None
        self._engine = engine
        self._clock = clock
        self._open_ports = ports or _real_ports
        self._on_topology = on_topology
        self.stats = ServiceStats()
        self.ports: InvalidationPorts | None = None
        self.book = FlowBook(only_offloaded=only_offloaded, bound=settings.queue_size)
        self.schedule = Schedule(
            reconcile_seconds=settings.reconcile_seconds, prune_seconds=settings.prune_seconds
        )
        self._prune: PruneRound | None = None
        self._prune_started = 0.0
        self._prune_step_max = 0.0
        self._event_time = 0.0

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = default_engine()
        return self._engine

    def _ports(self) -> InvalidationPorts:
        if self.ports is None:
            raise KernelError("invalidation", "the service is not started", errno.EBADF)
        return self.ports

    # -- life cycle -------------------------------------------------------------
    def start(self) -> None:
        """Subscribe first, then snapshot and dump: nothing falls between them."""
        engine = self.engine
        ports = self.ports = self._open_ports(self.netns, self.settings)
        try:
            ports.changes.open()
            ports.rtnl.open()
            self._event_time = self._clock()
            self._handle(ports.rtnl.snapshot())
            # The index is empty: streaming the dump as FlowSeen is the same as one
            # FlowsDumped, without a 100,000-entry tuple that would stay in the RSS.
            held = self._index_at_start(ports)
            self._emit({"event": "FlowsDumped", "flows": len(engine)})
            self._flush()
            for event in held:
                self._handle(event)
            self._flush()
        except BaseException:
            with contextlib.suppress(OSError):  # the start's own failure is the one to report
                self.stop()
            raise
        if self.freeze_gc:
            # The index is long-lived (100,000 records at 100,000 flows): without
            # this, each gen-2 collection walks all of it in the middle of an event
            # (tens of ms). Process-wide, hence a constructor flag.
            gc.freeze()
        self.schedule.start(self._clock())

    def _index_at_start(self, ports: InvalidationPorts) -> list[ev.Event]:
        """The start-up dump into the index; topology events queued meanwhile acted on
        during it (service/startup.py, core/startup.py) when the ports can look
        entries up, else all handled after it. Returns the events held till then."""
        handle, indexed, protocols = self._handle, self.book.indexed, ports.changes.protocols
        if ports.lookup is None:
            ports.changes.dump_each(lambda flow: handle(ev.FlowSeen(flow=indexed(flow))))
            return []

        def see(flow: Flow) -> None:
            if flow.orig.proto in protocols:
                handle(ev.FlowSeen(flow=indexed(flow)))

        def act_on(event: ev.Event) -> None:
            # Routes of what is indexed so far first (egress under the caches before
            # the event), then the event, then its teardown: at once.
            self._flush()
            self._event_time = self._clock()
            handle(event)
            self._flush()

        engine = self.engine
        return index_while_watching(
            dump=ports.dump,
            events=ports.rtnl,
            wait=ports.waiter.wait,
            see=see,
            act_on=act_on,
            look_up=ports.lookup.entries_of,
            caches=lambda: engine.caches,
            next_hops=lambda: next_hops(engine.index),
            limit=self.settings.queue_size,
        )

    def stop(self) -> None:
        ports, self.ports = self.ports, None
        self._prune = None
        if ports is None:
            return
        # Each closed even if an earlier close failed (the first failure is raised).
        failure: OSError | None = None
        for close in (
            ports.rtnl.close,
            ports.changes.close,
            ports.conntrack.close,
            ports.routes.close,
            ports.dump.close,
            ports.waiter.close,
        ):
            try:
                close()
            except OSError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def wake(self) -> None:
        """Make a blocked :meth:`step` return (signal handlers call this)."""
        if self.ports is not None:
            self.ports.waiter.wake()

    def fds(self) -> list[int]:
        ports = self._ports()
        return [
            ports.rtnl.fileno(),
            ports.changes.fileno(),
            ports.waiter.fileno(),
            ports.dump.fileno(),
        ]

    def next_deadline(self) -> float:
        """When (on the service's clock) a job is due: reconcile, prune, a next hop's wait."""
        return self.schedule.next_deadline()

    # -- one iteration -------------------------------------------------------------
    def step(self, timeout: float | None = 0.0) -> int:
        """Wait up to ``timeout`` for events, handle what is queued, tear down
        what the engine decided; returns the number of events handled."""
        ports = self._ports()
        rtnl, changes = ports.rtnl, ports.changes
        timeout = self.schedule.timeout(timeout, self._clock())
        # The dump socket is readable only while a prune reads its dump.
        fds = [rtnl.fileno(), changes.fileno(), ports.dump.fileno()]
        readable = ports.waiter.wait(fds, timeout)
        self._event_time = self._clock()
        handled = 0
        limit = self.settings.queue_size
        # Topology first: it is what makes flows stale; conntrack events only
        # keep the index current.
        if rtnl.fileno() in readable:
            events = rtnl.poll(limit)
            for event in events:
                self._handle(event)
            handled += len(events)
            # Act on what the topology made stale before conntrack events can
            # trigger a re-dump (FlowsDumped re-indexes from the current caches).
            self._flush()
        if changes.fileno() in readable:
            found, lost = changes.poll(limit)
            prune, changed = self._prune, self.book.changed
            for change in found:
                flow = changed(change.flow, new=change.new, gone=change.gone)
                if prune is not None:
                    prune.touch(flow)
                self._handle(ev.FlowGone(flow=flow) if change.gone else ev.FlowSeen(flow=flow))
            handled += len(found)
            if lost:
                self._handle(ev.EventsLost(source="conntrack"))
        schedule = self.schedule
        if schedule.reconcile_due(self._clock()):
            self.stats.reconciles += 1
            self._handle(rtnl.snapshot(lost=False))
            handled += 1
            schedule.reconciled(self._clock())
        for ifindex, ip in schedule.expired(self._clock()):
            self._handle(ev.NeighbourWaitExpired(ifindex=ifindex, ip=ip))
        if self._prune is not None:
            handled += self._prune_step()
        elif schedule.prune_due(self._clock()):
            self._begin_prune()
        self._flush()
        self.stats.events += handled
        return handled

    # -- prune: the index against a fresh dump ---------------------------------------
    def _begin_prune(self) -> None:
        rounds = self.stats.prunes + self.stats.prunes_abandoned
        index = self.engine.index
        self._prune = PruneRound(index, touched_limit=self.settings.queue_size, salt=rounds)
        self._prune_started = self._clock()
        self._prune_step_max = 0.0
        self.schedule.prune_started()
        self._ports().dump.begin()

    def _prune_step(self) -> int:
        """Feed the round at most PRUNE_STEP_ENTRIES dumped entries, then apply at
        most PRUNE_STEP_ENTRIES of its decisions (a round that drops a whole
        start-up population hands them out over many steps). Returns the flows
        it dropped or added."""
        ports = self._ports()
        assert self._prune is not None
        started = self._clock()
        # The dumped entries as the start-up dump indexes them (same view).
        prune, protocols, indexed = self._prune, ports.changes.protocols, self.book.indexed
        if not prune.finished:
            try:
                flows, complete = ports.dump.read(PRUNE_STEP_ENTRIES)
            except KernelError as exc:
                # Only the round is lost (the index is as good as before it): say
                # so, and try again next period.
                self.stats.errors += 1
                self._emit({"decision": "prune failed", "error": str(exc)})
                prune.abandon()
                flows, complete = [], True
            for flow in flows:
                if flow.orig.proto in protocols:
                    prune.dumped(indexed(flow))
            if complete:
                prune.finish()
        gone, seen = prune.take(PRUNE_STEP_ENTRIES)
        for flow in gone:
            self._handle(ev.FlowGone(flow=flow))
        for flow in seen:
            self._handle(ev.FlowSeen(flow=flow))
        now = self._clock()
        self._prune_step_max = max(self._prune_step_max, now - started)
        if prune.finished and not prune.done:
            # Decisions left and the dump socket drained: the wake-up makes the
            # next select (ours or the agent's) return at once for the next batch.
            ports.waiter.wake()
        if prune.done:
            self._prune = None
            self.schedule.prune_ended(now)
            st = self.stats
            if prune.overflowed:
                st.prunes_abandoned += 1
                self._emit({"decision": "prune abandoned", "dumped": prune.dumped_entries})
                return 0
            st.prunes += 1
            st.pruned += prune.gone
            st.prune_added += prune.added
            st.prune_changed += prune.changed
            st.last_prune_seconds = now - self._prune_started
            st.last_prune_step = self._prune_step_max
            self._emit(
                {
                    "decision": "pruned",
                    "dumped": prune.dumped_entries,
                    "gone": prune.gone,
                    "added": prune.added,
                    "changed": prune.changed,
                    "indexed": len(self.engine),
                    "seconds": round(st.last_prune_seconds, 3),
                    "longest_step_ms": round(self._prune_step_max * 1000, 1),
                }
            )
        return len(gone) + len(seen)

    # -- engine <-> kernel ---------------------------------------------------------
    def _emit(self, record: dict[str, Any]) -> None:
        if self._report is not None:
            self._report(record)

    def _handle(self, event: ev.Event) -> None:
        engine = self.engine
        if isinstance(event, ev.EventsLost):
            self.stats.events_lost += 1
        if self._report_events and not isinstance(event, ev.FlowSeen | ev.FlowGone):
            self._emit({"event": type(event).__name__} | _describe(event, engine.name))
        pending: list[ev.Event] = [event]
        while pending:
            for action in engine.handle(pending.pop(0)):
                follow_up = self._act(action)
                if follow_up is not None:
                    pending.append(follow_up)

    def _flush(self) -> None:
        engine = self.engine
        for _ in range(_FLUSH_ROUNDS):
            actions = engine.flush()
            if not actions:
                return
            for action in actions:  # teardowns first (the engine's order)
                follow_up = self._act(action)
                if follow_up is not None:
                    self._handle(follow_up)

    def _act(self, action: ev.Action) -> ev.Event | None:
        ports = self._ports()
        if isinstance(action, ev.ResolveRoutes):
            return ev.RoutesResolved(routes=ports.routes.lookup(action.addresses))
        if isinstance(action, ev.Resync):
            self.stats.resyncs += 1
            self._emit({"decision": "resync", "source": action.source})
            if action.source == "rtnl":
                return ports.rtnl.snapshot()
            if self._prune is not None:
                # The re-dump below does the round's job; its records would look
                # unconfirmed to the round. The round reads its dump to the end
                # (the only way to stop the kernel's) and decides nothing.
                self._prune.abandon()
            return ev.FlowsDumped(flows=tuple(map(self.book.indexed, ports.changes.dump())))
        if isinstance(action, ev.AwaitNeighbour):
            if self.schedule.wait(action.ifindex, action.ip, self._clock()):
                dev = {"dev": self.engine.name(action.ifindex), "dev_ifindex": action.ifindex}
                self._emit({"decision": "waiting for next hop", "ip": action.ip} | dev)
            return None
        if isinstance(action, ev.FlowsMarkedStale):
            self._emit({"decision": "stale", "cause": action.cause, "flows": len(action.flows)})
            return None
        if isinstance(action, ev.TopologyChanged):
            if self._on_topology is not None:
                self._on_topology(action)
            return None
        self._teardown(action)
        return None

    def _teardown(self, action: ev.TearDownFlows) -> None:
        """Live flows first, then those found idle last time (``FlowBook.order``);
        per group, the kernel says which are offloaded now (one batched CT_GET) and
        only those are torn down; the others stay indexed."""
        if not action.flows:
            return
        book, torn = self.book, 0
        for group in self.book.order(action.flows):
            if not group:
                continue
            if book.asks_kernel:
                flows, idle = book.checked(self._ports().conntrack.statuses(group))
            else:
                flows, idle = group, []
            self.stats.not_offloaded += len(idle)
            if flows:
                torn += len(flows)
                self._tear_down(flows, action.causes, len(group))
            # Still indexed (after the teardown line: what it costs is not on the
            # repair's path): the kernel may offload them later, silently.
            for flow in idle:
                self._handle(ev.FlowSeen(flow=flow))
        if not torn:
            self._emit({"decision": "left alone: not offloaded", "flows": len(action.flows)})

    def _tear_down(self, flows: list[Flow], causes: tuple[str, ...], judged: int) -> None:
        deleted = gone = recreated = by_traffic = 0
        if not self.dry_run:
            ct = self._ports().conntrack
            # Deleted = off the fast path (the kernel tears the offloaded flow
            # down with its entry); re-creating keeps NATed connections alive.
            result = ct.delete(flows)
            deleted, gone = result.deleted, result.already_gone
            self.stats.last_event_to_deleted = self._clock() - self._event_time
            if ct.last_deleted:
                self.book.torn_down(ct.last_deleted)
                # EEXIST: a packet reached conntrack between the delete and the
                # re-create and the kernel made the entry itself (mid-stream pickup).
                recreated, by_traffic = ct.reinject(ct.last_deleted)
            self.stats.teardowns += 1
            self.stats.flows_torn_down += deleted
            self.stats.already_gone += gone
            self.stats.recreated += recreated
        self.stats.last_event_to_teardown = self._clock() - self._event_time
        self._emit(
            {
                "decision": "would tear down" if self.dry_run else "tore down",
                "flows": len(flows),
                "not_offloaded": judged - len(flows),
                "deleted": deleted,
                "already_gone": gone,
                "recreated": recreated,
                "created_by_traffic": by_traffic,
                "causes": sorted(set(causes)),
            }
        )
