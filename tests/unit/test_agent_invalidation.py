"""The invalidation subsystem adapter with a fake service: restarts on a lost
socket, follows config changes, counts by cause, spots link events cheaply."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from controlplane.agent import logs
from controlplane.agent.invalidation import InvalidationSubsystem
from controlplane.config import Config, InvalidationConfig
from controlplane.core import events as ev
from controlplane.core.flowpath import Link
from controlplane.errors import KernelError
from controlplane.loader import parse_config


@dataclass
class Stats:
    events: int = 0
    resyncs: int = 0
    reconciles: int = 0
    flows_torn_down: int = 0
    errors: int = 0


@dataclass
class FakeService:
    netns: str | None
    settings: InvalidationConfig
    engine: Any = None
    report: Any = None
    stats: Stats = field(default_factory=Stats)
    started: bool = False
    stopped: bool = False
    fail_next_step: bool = False
    feed: list[ev.Event] = field(default_factory=list)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def fds(self) -> list[int]:
        return [100 + len(made)]

    def step(self, timeout: float | None = 0.0) -> int:
        if self.fail_next_step:
            self.fail_next_step = False
            raise KernelError("recv", "No buffer space available", 105)
        for event in self.feed:
            self.engine.handle(event)
        n = len(self.feed)
        self.feed.clear()
        self.report({"decision": "stale", "cause": "fdb_move", "flows": 2})
        self.report({"decision": "tore down", "flows": 2, "deleted": 2})
        self.stats.events += n
        return n


made: list[FakeService] = []


def factory(netns: str | None, settings: InvalidationConfig, **kw: Any) -> FakeService:
    svc = FakeService(netns, settings, engine=kw["engine"], report=kw["report"])
    made.append(svc)
    return svc


def cfg(**inv: Any) -> Config:
    return parse_config({"version": 1, "invalidation": inv})


def make() -> tuple[InvalidationSubsystem, list[int], io.StringIO]:
    made.clear()
    links: list[int] = []
    buf = io.StringIO()
    sub = InvalidationSubsystem(
        "ns1",
        logs.DecisionLog(logs.setup("json", buf)),
        on_links=lambda: links.append(1),
        make_service=factory,
    )
    return sub, links, buf


def test_follows_config() -> None:
    sub, _, _ = make()
    sub.reconfigure(cfg())
    assert len(made) == 1 and made[0].started and sub.fds() == [101]
    epoch = sub.epoch
    sub.reconfigure(cfg())  # same settings: the running service is kept
    assert len(made) == 1 and sub.epoch == epoch
    sub.reconfigure(cfg(watch=["fdb"]))  # changed: re-created, new fds, new epoch
    assert len(made) == 2 and made[0].stopped and sub.epoch > epoch
    sub.reconfigure(cfg(enabled=False))
    assert made[1].stopped and sub.fds() == [] and sub.stats() == {"enabled": False}


def test_link_events_and_losses_are_noticed_by_the_engine_wrapper() -> None:
    sub, links, _ = make()
    sub.reconfigure(cfg())
    link = Link(ifindex=7, name="tap7", master=3)
    made[0].feed += [
        ev.LinkChanged(link=link),
        ev.FdbEntryChanged(bridge=3, vlan=0, mac="02:00:00:00:00:01", port=7),
        ev.EventsLost(source="rtnl"),
        ev.LinkRemoved(ifindex=7),
    ]
    quiet = {"handle": lambda s, e: (), "flush": lambda s: (), "__len__": lambda s: 0}
    made[0].engine._inner = type("Quiet", (), quiet)()
    sub.on_readable()
    assert len(links) == 2  # the two link events, not the FDB one
    st = sub.stats()
    assert st["overflows"] == 1 and st["events"] == 4
    assert st["by_cause"] == {"fdb": 2, "neighbour": 0, "route": 0, "link": 0}  # bounded labels


def test_lost_socket_restarts_and_logs_one_line() -> None:
    sub, _, buf = make()
    sub.reconfigure(cfg())
    epoch = sub.epoch
    made[0].fail_next_step = True
    sub.on_readable()  # must not raise
    assert made[0].stopped and len(made) == 2 and made[1].started
    assert sub.epoch > epoch and sub.stats()["restarts"] == 1
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    errors = [d for d in lines if d["level"] == "error"]
    assert len(errors) == 1 and "restarting" in errors[0]["msg"]
    assert any(d["msg"] == "tore down" for d in lines) is False  # the failed step decided nothing
