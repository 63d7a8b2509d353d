"""The rtnetlink watcher against the real host kernel.

Lab: one namespace with bridge br0 and two veth ports p1, p2 (peers q1, q2 in
the same namespace). Every assertion here holds on the host kernel; nothing
needs the VM (the watcher only reads rtnetlink, which has no flowtable part).
The VM suite proves the other half: that the flows these events point at
stall without a teardown. The watcher keeps no cache: what it decodes is fed to
the engine here, whose caches are the one topology cache (as the service does).
"""

from __future__ import annotations

import os
import select
import socket
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from controlplane.core import events as ev
from controlplane.core.invalidation import Engine
from controlplane.kernel.netlink import SOL_NETLINK
from controlplane.kernel.rtnl.watcher import Watcher
from controlplane.testing import Bridge, NetLab, Netns, Topology, Veth
from tests.netns.conftest import sh

MAC = "02:00:00:00:aa:01"
NETLINK_DROP_MEMBERSHIP = 2
RTNLGRP_NEIGH = 3


def _ifindex(netns: str, name: str) -> int:
    return int(sh("cat", f"/sys/class/net/{name}/ifindex", netns=netns))


BRIDGE = Topology(
    namespaces={
        "ns": Netns(bridges=[Bridge("br0", ports=["p1", "p2"])], addresses={"br0": "10.0.1.1/24"})
    },
    links=[Veth("ns:p1", "ns:q1"), Veth("ns:p2", "ns:q2")],
)


@pytest.fixture
def bridge_ns(netlab: NetLab) -> str:
    return netlab.build(BRIDGE).ns("ns")


@pytest.fixture
def watcher(bridge_ns: str) -> Iterator[Watcher]:
    with Watcher(bridge_ns, rcvbuf=8 << 20) as w:
        yield w


def wait_for(
    w: Watcher, predicate: Callable[[ev.Event], bool], timeout: float = 5.0
) -> list[ev.Event]:
    """Poll (blocking on the socket, not sleeping) until an event matches; all events seen."""
    seen: list[ev.Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = w.poll()
        seen += got
        if any(predicate(e) for e in got):
            return seen
        select.select([w.fileno()], [], [], max(0.0, deadline - time.monotonic()))
    raise AssertionError(f"no matching event within {timeout}s; saw {seen}")


def engine_of(w: Watcher) -> Engine:
    """An engine whose caches start from the watcher's snapshot."""
    engine = Engine()
    engine.handle(w.snapshot())
    return engine


def feed(engine: Engine, w: Watcher, events: list[ev.Event]) -> None:
    """Events into the engine; a resync it asks for answered with a fresh snapshot."""
    for event in events:
        for action in engine.handle(event):
            if isinstance(action, ev.Resync):
                engine.handle(w.snapshot())


def test_the_snapshot_dumps_links_fdb_and_neighbours(bridge_ns: str, watcher: Watcher) -> None:
    sh("bridge", "fdb", "add", MAC, "dev", "p1", "master", "static", netns=bridge_ns)
    topology = watcher.snapshot().topology
    names = {link.name for link in topology.links.values()}
    assert {"br0", "p1", "p2", "q1", "q2", "lo"} <= names
    br0, p1 = _ifindex(bridge_ns, "br0"), _ifindex(bridge_ns, "p1")
    assert topology.links[p1].master == br0
    assert topology.links[br0].kind == "bridge"
    assert topology.fdb[(br0, 0, MAC)] == p1


def test_fdb_move_is_one_upsert_with_the_new_port(bridge_ns: str, watcher: Watcher) -> None:
    br0, p1, p2 = (_ifindex(bridge_ns, n) for n in ("br0", "p1", "p2"))
    sh("bridge", "fdb", "add", MAC, "dev", "p1", "master", "static", netns=bridge_ns)
    seen = wait_for(watcher, lambda e: isinstance(e, ev.FdbEntryChanged) and e.mac == MAC)
    assert ev.FdbEntryChanged(bridge=br0, vlan=0, mac=MAC, port=p1) in seen

    # The move: one RTM_NEWNEIGH with the new port, no delete.
    sh("bridge", "fdb", "replace", MAC, "dev", "p2", "master", "static", netns=bridge_ns)
    seen = wait_for(watcher, lambda e: isinstance(e, ev.FdbEntryChanged) and e.port == p2)
    assert ev.FdbEntryChanged(bridge=br0, vlan=0, mac=MAC, port=p2) in seen
    assert not any(isinstance(e, ev.FdbEntryRemoved) for e in seen)
    assert watcher.snapshot().topology.fdb[(br0, 0, MAC)] == p2

    sh("bridge", "fdb", "del", MAC, "dev", "p2", "master", netns=bridge_ns)
    wait_for(watcher, lambda e: e == ev.FdbEntryRemoved(bridge=br0, vlan=0, mac=MAC))
    assert (br0, 0, MAC) not in watcher.snapshot().topology.fdb


def test_neighbour_route_and_link_events(bridge_ns: str, watcher: Watcher) -> None:
    br0, p1, p2 = (_ifindex(bridge_ns, n) for n in ("br0", "p1", "p2"))
    ns = bridge_ns
    sh("ip", "-n", ns, "neigh", "add", "10.0.1.9", "lladdr", MAC, "dev", "br0", "nud", "permanent")
    wait_for(watcher, lambda e: e == ev.NeighbourChanged(ifindex=br0, ip="10.0.1.9", mac=MAC))
    other = "02:00:00:00:bb:02"
    sh("ip", "-n", ns, "neigh", "replace", "10.0.1.9", "lladdr", other, "dev", "br0")
    wait_for(watcher, lambda e: e == ev.NeighbourChanged(ifindex=br0, ip="10.0.1.9", mac=other))
    sh("ip", "-n", ns, "neigh", "del", "10.0.1.9", "dev", "br0")
    wait_for(watcher, lambda e: e == ev.NeighbourRemoved(ifindex=br0, ip="10.0.1.9"))

    sh("ip", "-n", ns, "route", "add", "198.51.100.0/24", "via", "10.0.1.9")
    wait_for(watcher, lambda e: e == ev.RouteChanged(prefix="198.51.100.0/24"))
    sh("ip", "-n", ns, "-6", "route", "add", "2001:db8::/32", "dev", "br0")
    wait_for(watcher, lambda e: e == ev.RouteChanged(prefix="2001:db8::/32"))

    sh("ip", "-n", ns, "link", "set", "q1", "down")  # p1 loses its carrier
    wait_for(
        watcher,
        lambda e: isinstance(e, ev.LinkChanged) and e.link.ifindex == p1 and not e.link.up,
    )
    sh("ip", "-n", ns, "link", "set", "p2", "nomaster")
    wait_for(
        watcher,
        lambda e: isinstance(e, ev.LinkChanged) and e.link.ifindex == p2 and e.link.master is None,
    )
    sh("ip", "-n", ns, "link", "del", "p2")
    wait_for(watcher, lambda e: e == ev.LinkRemoved(ifindex=p2))
    assert p2 not in watcher.snapshot().topology.links


def _batch(netns: str, lines: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        sh("bridge", "-batch", f.name, netns=netns)
    finally:
        os.unlink(f.name)


def _macs(n: int) -> list[str]:
    return [f"02:10:00:{i >> 16 & 0xFF:02x}:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}" for i in range(n)]


def _fdb_ports(netns: str, bridge: str) -> dict[str, str]:
    out = sh("bridge", "fdb", "show", "br", bridge, netns=netns)
    ports = {}
    for line in out.splitlines():
        parts = line.split()
        if "master" in parts and parts[0].startswith("02:10:"):
            ports[parts[0]] = parts[parts.index("dev") + 1]
    return ports


BURST = 20_000


def test_burst_overflows_and_the_resync_finds_every_change(bridge_ns: str) -> None:
    ns = bridge_ns
    br0, p1, p2 = (_ifindex(ns, n) for n in ("br0", "p1", "p2"))
    macs = _macs(BURST)
    # 64 KiB (the smallest config value; the kernel doubles it) holds ~150 events.
    with Watcher(ns, rcvbuf=65_536) as w:
        engine = engine_of(w)
        _batch(ns, [f"fdb add {m} dev p1 master static" for m in macs])
        first = w.poll()
        assert w.stats.overflows >= 1, "a 20,000-event burst must overflow a 128 KiB buffer"
        assert first[-1] == ev.EventsLost(source="rtnl")  # the rest was drained
        snapshots = w.stats.snapshots
        feed(engine, w, first)
        assert w.stats.snapshots == snapshots + 1  # the engine's resync
        assert all(engine.topology().fdb[(br0, 0, m)] == p1 for m in macs)

        # Every MAC moves to p2 in one burst: each move must reach the engine.
        overflows = w.stats.overflows
        _batch(ns, [f"fdb replace {m} dev p2 master static" for m in macs])
        second = w.poll()
        assert w.stats.overflows > overflows
        feed(engine, w, second)
        assert all(engine.topology().fdb[(br0, 0, m)] == p2 for m in macs)
        assert _fdb_ports(ns, "br0") == dict.fromkeys(macs, "p2")  # the kernel agrees


def test_reconcile_catches_a_change_that_was_never_announced(
    bridge_ns: str, watcher: Watcher
) -> None:
    ns = bridge_ns
    br0, p2 = _ifindex(ns, "br0"), _ifindex(ns, "p2")
    engine = engine_of(watcher)
    sh("bridge", "fdb", "add", MAC, "dev", "p1", "master", "static", netns=ns)
    feed(engine, watcher, wait_for(watcher, lambda e: isinstance(e, ev.FdbEntryChanged)))
    # Leave the group: the move below produces no notification for this
    # socket, as with hardware-learned entries.
    sock = socket.socket(fileno=os.dup(watcher.fileno()))
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, RTNLGRP_NEIGH)
        sh("bridge", "fdb", "replace", MAC, "dev", "p2", "master", "static", netns=ns)
        assert not any(isinstance(e, ev.FdbEntryChanged) for e in watcher.poll())
        assert engine.topology().fdb[(br0, 0, MAC)] != p2
        reconcile = watcher.snapshot(lost=False)
    finally:
        sock.close()
    engine.handle(reconcile)  # the engine diffs it against its caches
    assert engine.topology().fdb[(br0, 0, MAC)] == p2


def test_a_lost_socket_is_reported_and_resynced(bridge_ns: str, watcher: Watcher) -> None:
    ns = bridge_ns
    br0, p1 = _ifindex(ns, "br0"), _ifindex(ns, "p1")
    os.close(watcher.fileno())  # the socket dies under the watcher
    sh("bridge", "fdb", "add", MAC, "dev", "p1", "master", "static", netns=ns)
    got = watcher.poll()
    assert got == [ev.EventsLost(source="rtnl")]  # the engine's resync dumps what was missed
    assert watcher.snapshot().topology.fdb[(br0, 0, MAC)] == p1
    assert watcher.stats.socket_errors == 1
    # and it keeps working on its new socket
    sh("bridge", "fdb", "del", MAC, "dev", "p1", "master", netns=ns)
    wait_for(watcher, lambda e: isinstance(e, ev.FdbEntryRemoved) and e.mac == MAC)
