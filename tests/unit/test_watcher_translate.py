"""kernel/rtnl/watcher.translate: one decoded rtnetlink message, one event (an upsert;
the engine's caches drop repeats), with no cache of its own."""

from __future__ import annotations

import pytest

from controlplane.core import events as ev
from controlplane.core.flowpath import Link
from controlplane.kernel.rtnl.codec import Decoded, FdbMsg, LinkMsg, NeighMsg, RouteMsg, RouteState
from controlplane.kernel.rtnl.watcher import translate

MAC = "02:00:00:00:aa:01"
P1 = Link(4, "p1", "veth", master=3)

CASES: list[tuple[Decoded, ev.Event]] = [
    (FdbMsg((3, 0, MAC), 4), ev.FdbEntryChanged(bridge=3, vlan=0, mac=MAC, port=4)),
    (FdbMsg((3, 20, MAC), None), ev.FdbEntryRemoved(bridge=3, vlan=20, mac=MAC)),
    (NeighMsg((3, "10.0.0.2"), MAC), ev.NeighbourChanged(ifindex=3, ip="10.0.0.2", mac=MAC)),
    (NeighMsg((3, "fd00::2"), None), ev.NeighbourRemoved(ifindex=3, ip="fd00::2")),
    (LinkMsg(4, P1), ev.LinkChanged(link=P1)),
    (LinkMsg(4, None), ev.LinkRemoved(ifindex=4)),
    (RouteMsg((254, 2, "10.1.0.0/16"), RouteState(3, None)), ev.RouteChanged(prefix="10.1.0.0/16")),
    (RouteMsg((254, 10, "::/0"), None), ev.RouteChanged(prefix="::/0")),
]


@pytest.mark.parametrize(("change", "event"), CASES, ids=[type(c).__name__ for c, _ in CASES])
def test_each_message_is_one_event(change: Decoded, event: ev.Event) -> None:
    assert translate(change) == event
    assert translate(change) == translate(change)  # no state: a repeat means the same
