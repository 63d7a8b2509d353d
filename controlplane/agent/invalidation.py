"""The watcher + invalidation engine as a :class:`~controlplane.agent.ports.Subsystem`.

``controlplane.service.invalidation.InvalidationService`` owns the netlink
sockets and carries events to the pure engine; this adapter lets the agent's
selector drive it (``fds`` + ``step(0)``), turns its decision records into
the agent's log lines and status counters, and notices link changes (ports
joining or leaving a bridge, devices appearing or vanishing) so the agent can
re-plan the flowtable devices. It does that by wrapping the engine: every
event passes through :class:`_Observing` anyway, so spotting a link event
costs one isinstance check, not a record per FDB event.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from controlplane.agent.logs import DecisionLog
from controlplane.config import Config, InvalidationConfig
from controlplane.core import events as ev
from controlplane.core.flowpath import Flow
from controlplane.errors import ControlPlaneError

# Same switch as ``offloadctl watch`` (cli/flows.py): test-only, lets the host
# netns tests (no flowtables) drive the real teardown path through the agent.
TESTING_ALL_OFFLOADED = "OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED"

_LINK_EVENTS = (ev.LinkChanged, ev.LinkRemoved, ev.Snapshot)

# What made flows stale, as a bounded set (a metric label, status' by_cause):
# the engine's causes are prose naming MACs and addresses (the log keeps those).
CAUSE_KINDS = ("fdb", "neighbour", "route", "link")


def cause_kind(cause: str) -> str:
    """``"neighbour 10.0.0.1 on br0 is …"`` -> ``"neighbour"``; FDB causes start
    with the MAC (``"aa:… vlan 0 on br0 moved p1 -> p2"``)."""
    first = cause.split(" ", 1)[0]
    return first if first in CAUSE_KINDS else "fdb"


class _Observing:
    """Delegates to the engine; tells the agent when the link set may have changed."""

    def __init__(self, inner: Any, on_links: Callable[[], None], on_lost: Callable[[], None]):
        self._inner = inner
        self._on_links = on_links
        self._on_lost = on_lost

    def handle(self, event: ev.Event) -> Sequence[ev.Action]:
        if isinstance(event, _LINK_EVENTS):
            self._on_links()
        elif isinstance(event, ev.EventsLost):
            self._on_lost()
        actions: Sequence[ev.Action] = self._inner.handle(event)
        return actions

    def flush(self) -> Sequence[ev.Action]:
        actions: Sequence[ev.Action] = self._inner.flush()
        return actions

    def __len__(self) -> int:  # the service reports the indexed flow count after its dump
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        # Anything else the service asks of its engine is the engine's own.
        return getattr(self._inner, name)


def flow_doc(flow: Flow, orig: Any, reply: Any, names: dict[int, str]) -> dict[str, Any]:
    """One flow as ``offloadctl flows --json`` prints it (same keys), from the index."""

    def devices(egress: Any) -> list[str]:
        return [names.get(i, str(i)) for i in egress.devices] if egress is not None else []

    return {
        **flow.as_dict(),
        "orig_devices": devices(orig),
        "reply_devices": devices(reply),
        "ambiguous": any(e is not None and not e.complete for e in (orig, reply)),
    }


class InvalidationSubsystem:
    name = "invalidation"

    def __init__(
        self,
        netns: str | None,
        log: DecisionLog,
        on_links: Callable[[], None],
        *,
        make_service: Callable[..., Any] | None = None,  # a fake, in unit tests
    ) -> None:
        self.netns = netns
        self._make_service = make_service
        self._log = log
        self._on_links = on_links
        self._service: Any = None
        self._engine: _Observing | None = None
        self._settings: InvalidationConfig | None = None
        self.by_cause: dict[str, int] = dict.fromkeys(CAUSE_KINDS, 0)
        self.overflows = 0
        self.restarts = 0
        self.epoch = 0
        self._next_reconcile = float("inf")
        self.woke_at = 0.0  # wall clock of the last read of the sockets (join latency)

    # -- Subsystem ----------------------------------------------------------

    def fds(self) -> list[int]:
        return list(self._service.fds()) if self._service is not None else []

    def on_readable(self) -> None:
        if self._service is None:
            return
        self.woke_at = time.time()
        try:
            self._service.step(timeout=0)
        except (ControlPlaneError, OSError) as exc:
            # A lost socket: say so and start again (start = subscribe + dump),
            # so nothing that happened meanwhile is missed.
            self._log.error("invalidation", f"watcher failed, restarting: {exc}")
            self._restart()

    def tick(self) -> None:
        """Periodic: lets the service run its FDB/neighbour reconciliation or start
        its flow-index prune when due (events themselves, and the prune's dump,
        arrive through fds(), not through this)."""
        if self._service is None:
            return
        next_deadline = getattr(self._service, "next_deadline", None)
        due = next_deadline() if next_deadline is not None else self._next_reconcile
        if time.monotonic() < due:
            return
        self.on_readable()
        self._next_reconcile = time.monotonic() + self._period()

    def _period(self) -> float:
        period = self._settings.reconcile_seconds if self._settings else 0.0
        return period if period > 0 else float("inf")

    def reconfigure(self, cfg: Config) -> None:
        settings = cfg.invalidation
        if settings == self._settings and self._service is not None:
            return
        self.close()
        self._settings = settings
        if settings.enabled:
            self._start()

    def stats(self) -> dict[str, Any]:
        if self._service is None:
            return {"enabled": False}
        st = self._service.stats
        return {
            "enabled": True,
            "events": st.events,
            "overflows": self.overflows,
            "resyncs": st.resyncs,
            "reconciles": st.reconciles,
            # Flow-index prunes (periodic conntrack re-dump): rounds, flows dropped
            # because their entry was gone, missed ones added.
            "prunes": getattr(st, "prunes", 0),
            "pruned": getattr(st, "pruned", 0),
            "prune_added": getattr(st, "prune_added", 0),
            "flows_torn_down": st.flows_torn_down,
            "by_cause": dict(self.by_cause),
            "restarts": self.restarts,
            "errors": st.errors,
            # The engine's index: the offloaded flows it watches, live (no dump).
            "indexed_flows": len(self._engine) if self._engine is not None else 0,
        }

    def links(self) -> Mapping[int, Any] | None:
        """The engine's link cache (ifindex -> Link), once its first snapshot has
        filled it; None when the engine does not run or is not ready."""
        engine = self._engine
        if engine is None or not getattr(engine, "ready", False):
            return None
        # The engine's own map, copied: topology() would copy the FDB as well
        # (100,000 entries on a busy bridge) on every port join.
        links: Mapping[int, Any] = dict(engine._links)
        return links

    def flows(self, limit: int) -> tuple[list[dict[str, Any]], bool] | None:
        """Up to ``limit`` offloaded flows from the engine's index with the devices
        each direction leaves through; None when the engine does not run (then the
        agent dumps conntrack). Answered from memory: no kernel round trip."""
        engine = self._engine
        if engine is None:
            return None
        names = {i: link.name for i, link in engine.topology().links.items()}
        out: list[dict[str, Any]] = []
        for flow, orig, reply in engine.flows():
            if len(out) == limit:
                return out, True
            out.append(flow_doc(flow, orig, reply, names))
        return out, False

    def close(self) -> None:
        if self._service is not None:
            with contextlib.suppress(Exception):
                self._service.stop()
            self._service = None
            self._engine = None
            self.epoch += 1

    # -- internals ----------------------------------------------------------

    def _start(self) -> None:
        from controlplane.service.invalidation import InvalidationService, _default_engine

        assert self._settings is not None
        engine = _Observing(_default_engine(), self._on_links, self._lost)
        service = (self._make_service or InvalidationService)(
            self.netns,
            self._settings,
            only_offloaded=os.environ.get(TESTING_ALL_OFFLOADED) != "1",
            report=self._record,
            engine=engine,
            report_events=False,
        )
        service.start()
        self._service = service
        self._engine = engine
        self.epoch += 1
        self._next_reconcile = time.monotonic() + self._period()
        self._log.info("invalidation", "watching", sources=",".join(self._settings.watch))

    def _restart(self) -> None:
        self.restarts += 1
        self.close()
        try:
            self._start()
        except (ControlPlaneError, OSError) as exc:
            self._log.error("invalidation", f"cannot restart the watcher: {exc}")

    def _lost(self) -> None:
        self.overflows += 1

    def _record(self, record: dict[str, Any]) -> None:
        decision = record.get("decision")
        if decision is None:
            return
        if decision == "stale":
            kind = cause_kind(str(record.get("cause")))
            self.by_cause[kind] = self.by_cause.get(kind, 0) + int(record.get("flows", 0))
        fields = {k: v for k, v in record.items() if k != "decision"}
        self._log.info("invalidation", str(decision), **fields)
