"""The invalidation loop: kernel events in, the engine's decisions out, stale flows torn down.

One :class:`InvalidationService` per network namespace. It owns the sockets
(rtnetlink watcher, conntrack events, a conntrack request socket) and no
policy: every decision is the pure engine's (``core/invalidation.py``); this
module only carries events to it and its actions to the kernel. Explicit
:meth:`~InvalidationService.start` / :meth:`~InvalidationService.step` /
:meth:`~InvalidationService.stop`, no threads, no globals: ``offloadctl
watch`` runs it in the foreground and the agent embeds it in its own loop
(``fds()`` + ``step(timeout=0)``).

Bounded: the queues are the kernels' socket buffers (``rcvbuf_bytes``); each
step takes at most ``queue_size`` datagrams from each socket. What does not
fit stays in the kernel; if a buffer overflows, the watcher (or the
conntrack subscription) reports ``EventsLost`` and the engine asks for a
resync: never silent loss.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from controlplane.config import InvalidationConfig
from controlplane.core import events as ev
from controlplane.core.flowindex import PruneRound
from controlplane.core.flowpath import IPS_OFFLOAD, Flow
from controlplane.core.reinject import IPPROTO_TCP, IPPROTO_UDP
from controlplane.errors import KernelError
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket, DumpStream
from controlplane.kernel.ctnetlink.events import CtEvents
from controlplane.kernel.ctnetlink.lookup import entries_of
from controlplane.kernel.netlink import NetlinkSocket
from controlplane.kernel.rtnl.topology import lookup_routes_on
from controlplane.kernel.rtnl.watcher import Watcher
from controlplane.service.startup import index_while_watching

__all__ = ["Engine", "InvalidationService", "ServiceStats"]

Report = Callable[[dict[str, Any]], None]
CT_MIN_RCVBUF = 32 << 20
# Dump entries a prune handles per step (whole datagrams: ~150 entries each):
# ~5-8 ms of decoding and lookups, so events wait at most that long behind a
# prune (bench_invalidation.py measures the longest step at 100,000 entries).
PRUNE_STEP_ENTRIES = 256

# How long flows wait for their new next hop to resolve before they are torn down
# anyway (``AwaitNeighbour``; the engine decides which flows wait and why). The next
# hop resolves when traffic starts using it (its first ARP/ND exchange with the router:
# milliseconds), which after a route change can take a while: other routers and hosts
# change their routes too (in the VM under load, 0.3-0.6 s after ours). A 0.25 s wait
# expired first and brought the early teardown back (docs/kernel-facts.md). The wait
# only bounds a next hop nothing talks to; the flow keeps its cached path meanwhile.
NEXT_HOP_WAIT = 1.0

# What flowtables offload; both may be offloaded without an event (``_indexed``).
_PORT_PROTOCOLS = (IPPROTO_TCP, IPPROTO_UDP)


class Engine(Protocol):
    """What the loop needs of ``core/invalidation``: events in, actions out."""

    def handle(self, event: ev.Event) -> Sequence[ev.Action]: ...

    def flush(self) -> Sequence[ev.Action]: ...

    def __len__(self) -> int: ...


@dataclass
class ServiceStats:
    events: int = 0
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


def _default_engine() -> Engine:
    from controlplane.core.invalidation import Engine as InvalidationEngine
    from controlplane.core.invalidation import Policy

    return InvalidationEngine(Policy())


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
        elif name == "routes":
            record["routes"] = len(value)
        elif name == "addresses":
            record["addresses"] = len(value)
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

    ``dry_run``: decisions are reported, nothing is deleted. Offloaded entries
    are indexed, and so are the entries the kernel may offload without telling
    (``_indexed``); a teardown asks the kernel which of its flows are offloaded
    now and leaves the others alone (``_on_fast_path``). ``only_offloaded``
    False is the test-only switch (``OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED``):
    every TCP/UDP entry is indexed and torn down as if it carried IPS_OFFLOAD,
    because the host kernel has no flowtables.
    ``report`` receives one record per event and per decision (``offloadctl
    watch`` prints them); ``None`` reports nothing.
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
        self.stats = ServiceStats()
        self.watcher = Watcher(
            netns,
            sources=settings.watch,
            rcvbuf=settings.rcvbuf_bytes,
        )
        # Our own teardowns echo two conntrack events per flow (DESTROY, then
        # NEW of the re-created entry): a buffer smaller than that echo would
        # turn every teardown into a full re-dump, so it never goes below
        # CT_MIN_RCVBUF whatever rcvbuf_bytes (sized for rtnetlink bursts) says.
        ct_rcvbuf = max(settings.rcvbuf_bytes, CT_MIN_RCVBUF)
        self.conntrack = CtEvents(netns, rcvbuf=ct_rcvbuf, updates=True)
        self._ct: ConntrackSocket | None = None
        self._rt: NetlinkSocket | None = None
        self._wake_r = self._wake_w = -1
        self._next_reconcile = float("inf")
        self._waits: dict[tuple[int, str], float] = {}  # next hop -> when its wait is over
        self._dump: DumpStream | None = None
        self._prune: PruneRound | None = None
        self._prune_started = 0.0
        self._prune_step_max = 0.0
        self._next_prune = float("inf")
        self._event_time = 0.0
        # Entries this service re-created, by (zone, original tuple). The kernel
        # re-offloads such an entry on its next forwarded packet and sends NO
        # event for it (setting IPS_OFFLOAD is silent; the entry is already
        # ASSURED), so its NEW event is the last news we get: index it as
        # possibly offloaded, or the next move of that flow is missed (VM).
        self._recreated: dict[tuple[int, object], None] = {}
        # Indexed entries a teardown found NOT offloaded (by zone, orig tuple): the
        # next teardown checks them after the others, so a host's idle UDP
        # entries (dozens: DNS...) do not delay the repair of its live flows.
        self._idle: dict[tuple[int, object], None] = {}

    # -- life cycle -------------------------------------------------------------
    def start(self) -> None:
        """Subscribe first, then dump: nothing falls between the two."""
        if self._engine is None:
            self._engine = _default_engine()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.conntrack.open()
        self.watcher.open()
        self._ct = ConntrackSocket(self.netns)
        self._rt = NetlinkSocket(socket.NETLINK_ROUTE, self.netns, operation="route lookup")
        self._dump = DumpStream(self.netns)
        self._event_time = self._clock()
        self._handle(self.watcher.snapshot())
        # The index is empty: streaming the dump as FlowSeen is the same as one
        # FlowsDumped, without a 100,000-entry tuple that would stay in the RSS.
        # Topology events are acted on during it (service/startup.py, core/startup.py).
        held = index_while_watching(
            dump=self._dump,
            events=self.watcher,
            see=self._see_dumped,
            act_on=self._act_during_startup,
            look_up=lambda addresses: entries_of(addresses, self.netns),
            neighbours=lambda: self.watcher.caches.neighbours,
            gateways=self.watcher.caches.gateways,
            limit=self.settings.queue_size,
        )
        self._emit({"event": "FlowsDumped", "flows": len(self._engine)})
        self._flush()
        for event in held:
            self._handle(event)
        self._flush()
        if self.freeze_gc:
            # The index is long-lived (100,000 records at 100,000 flows): without
            # this, each gen-2 collection walks all of it in the middle of an event
            # (tens of ms). Process-wide, hence a constructor flag.
            gc.freeze()
        period = self.settings.reconcile_seconds
        self._next_reconcile = self._clock() + period if period > 0 else float("inf")
        self._schedule_prune()

    def _see_dumped(self, flow: Flow) -> None:
        if flow.orig.proto in self.conntrack.protocols:
            self._handle(ev.FlowSeen(flow=self._indexed(flow)))

    def _act_during_startup(self, event: ev.Event) -> None:
        # Routes of what is indexed so far first (egress under the caches before
        # the event), then the event, then its teardown: at once.
        self._flush()
        self._event_time = self._clock()
        self._handle(event)
        self._flush()

    def stop(self) -> None:
        self.watcher.close()
        self.conntrack.close()
        if self._ct is not None:
            self._ct.close()
            self._ct = None
        if self._rt is not None:
            self._rt.close()
            self._rt = None
        if self._dump is not None:
            self._dump.close()
            self._dump = None
        self._prune = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def wake(self) -> None:
        """Make a blocked :meth:`step` return (signal handlers call this)."""
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    def fds(self) -> list[int]:
        # The dump socket is readable only while a prune reads its dump.
        fds = [self.watcher.fileno(), self.conntrack.fileno(), self._wake_r]
        return fds + ([self._dump.fileno()] if self._dump is not None else [])

    def next_deadline(self) -> float:
        """When (on the service's clock) a job is due: reconcile, prune, a next hop's wait."""
        waits = min(self._waits.values(), default=float("inf"))
        return min(self._next_reconcile, self._next_prune, waits)

    # -- one iteration -------------------------------------------------------------
    def step(self, timeout: float | None = 0.0) -> int:
        """Wait up to ``timeout`` for events, handle what is queued, tear down
        what the engine decided; returns the number of events handled."""
        now = self._clock()
        if timeout is not None:
            timeout = max(0.0, min(timeout, self.next_deadline() - now))
        readable, _, _ = select.select(self.fds(), [], [], timeout)
        self._event_time = self._clock()
        handled = 0
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        limit = self.settings.queue_size
        # Topology first: it is what makes flows stale; conntrack events only
        # keep the index current.
        if self.watcher.fileno() in readable:
            events = self.watcher.poll(limit)
            for event in events:
                self._handle(event)
            handled += len(events)
            # Act on what the topology made stale before conntrack events can
            # trigger a re-dump (FlowsDumped re-indexes from the current caches).
            self._flush()
        if self.conntrack.fileno() in readable:
            changes, lost = self.conntrack.poll(limit)
            prune = self._prune
            for change in changes:
                flow = self._offloaded(change.flow)
                self._idle.pop((flow.zone, flow.orig), None)  # news: check it first again
                if change.new and self._recreated.pop((flow.zone, flow.orig), 0) is None:
                    flow = replace(flow, status=flow.status | IPS_OFFLOAD)
                elif not change.gone:
                    flow = self._indexed(flow)
                if prune is not None:
                    prune.touch(flow)
                self._handle(ev.FlowGone(flow=flow) if change.gone else ev.FlowSeen(flow=flow))
            handled += len(changes)
            if lost:
                self._handle(ev.EventsLost(source="conntrack"))
        if self._clock() >= self._next_reconcile:
            found = self.watcher.reconcile()
            self.stats.reconciles += 1
            for event in found:
                self._handle(event)
            handled += len(found)
            period = self.settings.reconcile_seconds
            self._next_reconcile = self._clock() + period
        if self._waits:
            now = self._clock()
            for key, due in list(self._waits.items()):
                if due <= now:
                    del self._waits[key]
                    self._handle(ev.NeighbourWaitExpired(ifindex=key[0], ip=key[1]))
        if self._prune is not None:
            handled += self._prune_step()
        elif self._clock() >= self._next_prune:
            self._begin_prune()
        self._flush()
        self.stats.events += handled
        return handled

    # -- prune: the index against a fresh dump ---------------------------------------
    def _schedule_prune(self) -> None:
        period = self.settings.prune_seconds
        self._next_prune = self._clock() + period if period > 0 else float("inf")

    def _begin_prune(self) -> None:
        index = getattr(self._engine, "index", None)
        if index is None or self._dump is None:  # an engine without an index to prune
            self._next_prune = float("inf")
            return
        rounds = self.stats.prunes + self.stats.prunes_abandoned
        self._prune = PruneRound(index, touched_limit=self.settings.queue_size, salt=rounds)
        self._prune_started = self._clock()
        self._prune_step_max = 0.0
        self._next_prune = float("inf")
        self._dump.begin()

    def _prune_step(self) -> int:
        """Feed the round at most PRUNE_STEP_ENTRIES dumped entries, then apply at
        most PRUNE_STEP_ENTRIES of its decisions (a round that drops a whole
        start-up population hands them out over many steps). Returns the flows
        it dropped or added."""
        assert self._dump is not None and self._prune is not None
        started = self._clock()
        # The dumped entries as the start-up dump indexes them (same view).
        prune, protocols, offloaded = self._prune, self.conntrack.protocols, self._indexed
        if not prune.finished:
            try:
                flows, complete = self._dump.read(PRUNE_STEP_ENTRIES)
            except KernelError as exc:
                # Only the round is lost (the index is as good as before it): say
                # so, and try again next period.
                self.stats.errors += 1
                self._emit({"decision": "prune failed", "error": str(exc)})
                prune.abandon()
                flows, complete = [], True
            for flow in flows:
                if flow.orig.proto in protocols:
                    prune.dumped(offloaded(flow))
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
            # Decisions left and the dump socket drained: the wake pipe makes the
            # next select (ours or the agent's) return at once for the next batch.
            self.wake()
        if prune.done:
            self._prune = None
            self._schedule_prune()
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
                    "indexed": len(self._engine) if self._engine is not None else 0,
                    "seconds": round(st.last_prune_seconds, 3),
                    "longest_step_ms": round(self._prune_step_max * 1000, 1),
                }
            )
        return len(gone) + len(seen)

    # -- engine <-> kernel ---------------------------------------------------------
    def _offloaded(self, flow: Flow) -> Flow:
        if self.only_offloaded:
            return flow
        return replace(flow, status=flow.status | IPS_OFFLOAD)

    def _indexed(self, flow: Flow) -> Flow:
        """``flow`` as the index takes it: a TCP or UDP entry counts as possibly offloaded.

        The kernel sets IPS_OFFLOAD WITHOUT an event when the packet that offloads
        an entry changes nothing else in it. UDP needs no reply to be offloaded:
        a flow whose second packet comes before any reply is offloaded silently,
        its replies then take the fast path and never reach conntrack, so no event
        ever says so (seen in the VM: ``[UNREPLIED] [OFFLOAD]``, its host's move
        never repaired). TCP under a policy's ``min_packets`` is offloaded on a
        later packet of an established entry, just as silently; entries we
        re-created are handled in ``step``. A teardown asks the kernel first
        (``_on_fast_path``), so entries still on the classic path are left alone.
        """
        flow = self._offloaded(flow)
        if flow.orig.proto in _PORT_PROTOCOLS and not flow.status & IPS_OFFLOAD:
            return replace(flow, status=flow.status | IPS_OFFLOAD)
        return flow

    def _name_of(self, ifindex: int) -> str:
        link = self.watcher.caches.links.get(ifindex)
        return link.name if link is not None else str(ifindex)

    def _emit(self, record: dict[str, Any]) -> None:
        if self._report is not None:
            self._report(record)

    def _handle(self, event: ev.Event) -> None:
        assert self._engine is not None
        if self._report_events and not isinstance(event, ev.FlowSeen | ev.FlowGone):
            self._emit({"event": type(event).__name__} | _describe(event, self._name_of))
        pending: list[ev.Event] = [event]
        while pending:
            for action in self._engine.handle(pending.pop(0)):
                follow_up = self._act(action)
                if follow_up is not None:
                    pending.append(follow_up)

    def _flush(self) -> None:
        # Route answers can mark more flows stale: flush until the engine is quiet
        # (bounded: each round resolves only addresses not yet answered).
        assert self._engine is not None
        for _ in range(8):
            actions = self._engine.flush()
            if not actions:
                return
            # Deletions first: they are what the event -> gone latency measures.
            actions = sorted(actions, key=lambda a: not isinstance(a, ev.TearDownFlows))
            for action in actions:
                follow_up = self._act(action)
                if follow_up is not None:
                    self._handle(follow_up)

    def _act(self, action: ev.Action) -> ev.Event | None:
        if isinstance(action, ev.ResolveRoutes):
            assert self._rt is not None
            routes = lookup_routes_on(self._rt, action.addresses)
            return ev.RoutesResolved(routes=routes)
        if isinstance(action, ev.Resync):
            self.stats.resyncs += 1
            self._emit({"decision": "resync", "source": action.source})
            if action.source == "rtnl":
                # The watcher dumped and diffed when it saw the overflow; its
                # caches are the fresh dump.
                return self.watcher.snapshot()
            if self._prune is not None:
                # The re-dump below does the round's job; its records would look
                # unconfirmed to the round. The round reads its dump to the end
                # (the only way to stop the kernel's) and decides nothing.
                self._prune.abandon()
            return ev.FlowsDumped(flows=tuple(map(self._indexed, self.conntrack.dump())))
        if isinstance(action, ev.AwaitNeighbour):
            self._waits.setdefault((action.ifindex, action.ip), self._clock() + NEXT_HOP_WAIT)
            dev = {"dev": self._name_of(action.ifindex), "dev_ifindex": action.ifindex}
            self._emit({"decision": "waiting for next hop", "ip": action.ip} | dev)
            return None
        if isinstance(action, ev.FlowsMarkedStale):
            self._emit({"decision": "stale", "cause": action.cause, "flows": len(action.flows)})
            return None
        if isinstance(action, ev.TearDownFlows):
            self._teardown(action)
        return None

    def _on_fast_path(self, flows: tuple[Flow, ...]) -> tuple[list[Flow], list[Flow]]:
        """(offloaded, still there but not offloaded) as the kernel says now (one
        batched CT_GET): the index holds entries that may be offloaded
        (``_indexed``, re-created ones); the others are left alone."""
        if not self.only_offloaded:  # the test-only switch: all are offloaded
            return list(flows), []
        assert self._ct is not None
        offloaded: list[Flow] = []
        idle: list[Flow] = []
        for flow, status in self._ct.statuses(flows):
            if status is not None:
                (offloaded if status & IPS_OFFLOAD else idle).append(flow)
        return offloaded, idle

    def _teardown(self, action: ev.TearDownFlows) -> None:
        if not action.flows:
            return
        judged = len(action.flows)
        idle_before = self._idle
        # Entries found idle last time go second: each check costs a round of
        # CT_GET decoding, and what users wait for is the live flows' repair.
        groups = (
            [f for f in action.flows if (f.zone, f.orig) not in idle_before],
            [f for f in action.flows if (f.zone, f.orig) in idle_before],
        )
        torn = 0
        for group in groups:
            if not group:
                continue
            flows, idle = self._on_fast_path(tuple(group))
            self.stats.not_offloaded += len(idle)
            for flow in flows:
                idle_before.pop((flow.zone, flow.orig), None)
            if flows:
                torn += len(flows)
                self._tear_down(flows, action.causes, len(group))
            # Still indexed: the kernel may offload them later, silently (after
            # the teardown line: what it costs is not on the repair's path).
            for flow in idle:
                self._idle[(flow.zone, flow.orig)] = None
                self._handle(ev.FlowSeen(flow=replace(flow, status=flow.status | IPS_OFFLOAD)))
        while len(self._idle) > self.settings.queue_size:  # bounded: oldest first out
            del self._idle[next(iter(self._idle))]
        if not torn:
            self._emit({"decision": "left alone: not offloaded", "flows": judged})

    def _tear_down(self, flows: list[Flow], causes: tuple[str, ...], judged: int) -> None:
        deleted = gone = recreated = by_traffic = 0
        if not self.dry_run:
            assert self._ct is not None
            # Deleted = off the fast path (the kernel tears the offloaded flow
            # down with its entry); re-creating keeps NATed connections alive.
            result = self._ct.delete(flows)
            deleted, gone = result.deleted, result.already_gone
            self.stats.last_event_to_deleted = self._clock() - self._event_time
            if self._ct.last_deleted:
                for flow in self._ct.last_deleted:
                    self._recreated[(flow.zone, flow.orig)] = None
                while len(self._recreated) > self.settings.queue_size:  # bounded
                    del self._recreated[next(iter(self._recreated))]
                # EEXIST: a packet reached conntrack between the delete and the
                # re-create and the kernel made the entry itself (mid-stream pickup).
                recreated, by_traffic = self._ct.reinject(self._ct.last_deleted)
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
