"""The invalidation subsystem adapter over the real service and fake kernel ports
(tests/unit/fake_invalidation.py): restarts on a lost socket, follows config
changes, counts by cause, passes the engine's link notices on."""

from __future__ import annotations

import errno
import io
import json
from typing import Any

from controlplane.agent import logs
from controlplane.agent.invalidation import InvalidationSubsystem
from controlplane.config import Config, InvalidationConfig
from controlplane.core import events as ev
from controlplane.core.flowpath import Link
from controlplane.loader import parse_config
from controlplane.service.invalidation import InvalidationService
from tests.unit.fake_invalidation import FakeKernel
from tests.unit.test_invalidation import BR0, MACS, P1, P2, base_world, tcp_flow

made: list[InvalidationService] = []


def cfg(**inv: Any) -> Config:
    return parse_config({"version": 1, "invalidation": inv})


def make() -> tuple[InvalidationSubsystem, list[int], io.StringIO, FakeKernel]:
    made.clear()
    kernel = FakeKernel(base_world())

    def factory(netns: str | None, settings: InvalidationConfig, **kw: Any) -> Any:
        service = InvalidationService(
            netns, settings, ports=kernel.ports, clock=kernel.clock, freeze_gc=False, **kw
        )
        made.append(service)
        return service

    links: list[int] = []
    buf = io.StringIO()
    sub = InvalidationSubsystem(
        "ns1",
        logs.DecisionLog(logs.setup("json", buf)),
        on_links=lambda: links.append(1),
        make_service=factory,
    )
    return sub, links, buf, kernel


def test_follows_config() -> None:
    sub, _, _, kernel = make()
    sub.reconfigure(cfg())
    assert len(made) == 1 and sub.fds() and set(sub.fds()) <= set(kernel.sockets)
    epoch, fds = sub.epoch, sub.fds()
    sub.reconfigure(cfg())  # same settings: the running service is kept
    assert len(made) == 1 and sub.epoch == epoch
    sub.reconfigure(cfg(watch=["fdb"]))  # changed: re-created, new fds, new epoch
    assert len(made) == 2 and sub.epoch > epoch and not set(fds) & set(kernel.sockets)
    sub.reconfigure(cfg(enabled=False))
    assert kernel.sockets == {} and sub.fds() == [] and sub.stats() == {"enabled": False}
    assert sub.links() is None


def test_link_notices_and_losses_reach_the_agent() -> None:
    sub, links, _, kernel = make()
    kernel.add(tcp_flow("10.0.0.2", "198.51.100.7", masq=True), silent=True)
    sub.reconfigure(cfg())
    assert len(links) == 1  # the start-up snapshot filled the engine's link cache
    seen = sub.links()
    assert seen is not None and seen[P1].master == BR0
    kernel.link(Link(7, "tap7", "veth", master=BR0))
    kernel.change(ev.FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P2))
    sub.on_readable()
    assert len(links) == 2  # the link event, not the FDB one
    seen = sub.links()
    assert seen is not None and seen[7].name == "tap7"
    kernel.capacity = 0
    kernel.change(ev.LinkRemoved(ifindex=7))  # overflows: found by the resync
    sub.on_readable()
    assert len(links) == 3
    seen = sub.links()
    assert seen is not None and 7 not in seen
    st = sub.stats()
    assert st["overflows"] == 1 and st["flows_torn_down"] == 1
    assert st["by_cause"] == {"fdb": 1, "neighbour": 0, "route": 0, "link": 0}  # bounded labels
    flows = sub.flows(10)
    assert flows is not None and flows[1] is False
    assert [f["reply_devices"] for f in flows[0]] == [["br0", "p2"]]


def test_lost_socket_restarts_and_logs_one_line() -> None:
    sub, _, buf, kernel = make()
    sub.reconfigure(cfg())
    epoch = sub.epoch
    kernel.fail_poll = errno.ENETDOWN
    kernel.change(ev.FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P2))
    sub.on_readable()  # must not raise
    assert len(made) == 2 and len(kernel.sockets) == 6  # the first service's ports closed
    assert sub.epoch > epoch and sub.stats()["restarts"] == 1
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    errors = [d for d in lines if d["level"] == "error"]
    assert len(errors) == 1 and "restarting" in errors[0]["msg"]
    assert any(d["msg"] == "tore down" for d in lines) is False  # the failed step decided nothing
