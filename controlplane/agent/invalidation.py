"""The watcher + invalidation engine as a :class:`~controlplane.agent.ports.Subsystem`.

``controlplane.service.invalidation.InvalidationService`` pumps kernel events to
the pure engine over its ports; this adapter lets the agent's selector drive it
(``fds`` + ``step(0)``), turns its decision records into the agent's log lines
and status counters, and passes the engine's ``TopologyChanged`` notices on
(ports joining or leaving a bridge, devices appearing or vanishing) so the agent
can re-plan the flowtable devices from the links they carry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from controlplane.agent.logs import DecisionLog
from controlplane.config import Config, InvalidationConfig
from controlplane.core import events as ev
from controlplane.core.flowbook import only_offloaded
from controlplane.core.flowdoc import flow_json
from controlplane.core.flowpath import Egress, Flow, Link
from controlplane.errors import ControlPlaneError

# What made flows stale, as a bounded set (a metric label, status' by_cause):
# the engine's causes are prose naming MACs and addresses (the log keeps those).
CAUSE_KINDS = ("fdb", "neighbour", "route", "link")


def cause_kind(cause: str) -> str:
    """``"neighbour 10.0.0.1 on br0 is …"`` -> ``"neighbour"``; FDB causes start
    with the MAC (``"aa:… vlan 0 on br0 moved p1 -> p2"``)."""
    first = cause.split(" ", 1)[0]
    return first if first in CAUSE_KINDS else "fdb"


class IndexView(Protocol):
    """What the subsystem reads of the engine (``core/invalidation.Engine``)."""

    def __len__(self) -> int: ...

    def name(self, ifindex: int) -> str: ...

    def flows(self) -> Iterator[tuple[Flow, Egress | None, Egress | None]]: ...


class Stats(Protocol):
    """The service's counters the subsystem reports (``ServiceStats``)."""

    events: int
    events_lost: int
    resyncs: int
    reconciles: int
    prunes: int
    pruned: int
    prune_added: int
    flows_torn_down: int
    errors: int


class Service(Protocol):
    """What the subsystem calls on ``InvalidationService`` (a fake in unit tests)."""

    @property
    def stats(self) -> Stats: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def fds(self) -> list[int]: ...

    def step(self, timeout: float | None = 0.0) -> int: ...

    def next_deadline(self) -> float: ...


MakeService = Callable[..., Service]


class InvalidationSubsystem:
    name = "invalidation"

    def __init__(
        self,
        netns: str | None,
        log: DecisionLog,
        on_links: Callable[[], None],
        *,
        make_service: MakeService | None = None,  # unit tests: the service over fake ports
    ) -> None:
        self.netns = netns
        self._make_service = make_service
        self._log = log
        self._on_links = on_links
        self._service: Service | None = None
        self._engine: IndexView | None = None
        self._links: Mapping[int, Link] | None = None  # from the last TopologyChanged
        self._settings: InvalidationConfig | None = None
        self.by_cause: dict[str, int] = dict.fromkeys(CAUSE_KINDS, 0)
        self._lost_before = 0  # EventsLost of the services before a restart
        self.restarts = 0
        self.epoch = 0
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
        """Periodic: lets the service run its FDB/neighbour reconciliation, a next
        hop's wait or its flow-index prune when due (events themselves, and the
        prune's dump, arrive through fds(), not through this)."""
        if self._service is None or time.monotonic() < self._service.next_deadline():
            return
        self.on_readable()

    def reconfigure(self, cfg: Config) -> None:
        settings = cfg.invalidation
        if settings == self._settings and self._service is not None:
            return
        self.close()
        self._settings = settings
        if settings.enabled:
            self._start()

    @property
    def overflows(self) -> int:
        """Event losses (socket overflows, lost sockets) since the agent started."""
        now = self._service.stats.events_lost if self._service is not None else 0
        return self._lost_before + now

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
            "prunes": st.prunes,
            "pruned": st.pruned,
            "prune_added": st.prune_added,
            "flows_torn_down": st.flows_torn_down,
            "by_cause": dict(self.by_cause),
            "restarts": self.restarts,
            "errors": st.errors,
            # The engine's index: the offloaded flows it watches, live (no dump).
            "indexed_flows": len(self._engine) if self._engine is not None else 0,
        }

    def links(self) -> Mapping[int, Link] | None:
        """The engine's links (ifindex -> Link) as its last ``TopologyChanged`` notice
        carried them (read-only); None when the engine does not run or has not had
        its first snapshot yet."""
        return self._links if self._service is not None else None

    def flows(self, limit: int) -> tuple[list[dict[str, Any]], bool] | None:
        """Up to ``limit`` offloaded flows from the engine's index with the devices
        each direction leaves through; None when the engine does not run (then the
        agent dumps conntrack). Answered from memory: no kernel round trip."""
        engine = self._engine
        if engine is None:
            return None
        out: list[dict[str, Any]] = []
        for flow, orig, reply in engine.flows():
            if len(out) == limit:
                return out, True
            out.append(flow_json(flow, orig, reply, engine.name))
        return out, False

    def close(self) -> None:
        service, self._service = self._service, None
        if service is None:
            return
        self._lost_before += service.stats.events_lost
        self._engine = None
        self._links = None
        self.epoch += 1
        try:
            service.stop()
        except (ControlPlaneError, OSError) as exc:
            # Closing what may already be broken (why we restart): said, not raised.
            self._log.error("invalidation", f"closing the watcher: {exc}")

    # -- internals ----------------------------------------------------------

    def _start(self) -> None:
        from controlplane.core.invalidation import Engine, Policy
        from controlplane.service.invalidation import InvalidationService

        assert self._settings is not None
        engine = Engine(Policy())
        make: MakeService = self._make_service or InvalidationService
        service = make(
            self.netns,
            self._settings,
            only_offloaded=only_offloaded(os.environ),
            report=self._record,
            engine=engine,
            report_events=False,
            on_topology=self._topology_changed,
        )
        # Set before start(): its snapshot already notices the links.
        self._service, self._engine = service, engine
        try:
            service.start()
        except BaseException:
            self._service = self._engine = self._links = None
            raise
        self.epoch += 1
        self._log.info("invalidation", "watching", sources=",".join(self._settings.watch))

    def _restart(self) -> None:
        self.restarts += 1
        self.close()
        try:
            self._start()
        except (ControlPlaneError, OSError) as exc:
            self._log.error("invalidation", f"cannot restart the watcher: {exc}")

    def _topology_changed(self, notice: ev.TopologyChanged) -> None:
        self._links = notice.links
        self._on_links()

    def _record(self, record: dict[str, Any]) -> None:
        decision = record.get("decision")
        if decision is None:
            return
        if decision == "stale":
            kind = cause_kind(str(record.get("cause")))
            self.by_cause[kind] = self.by_cause.get(kind, 0) + int(record.get("flows", 0))
        fields = {k: v for k, v in record.items() if k != "decision"}
        self._log.info("invalidation", str(decision), **fields)
