"""Live differential test: the same namespace dumped through our codec and through
pyroute2's ``IPRoute`` must give the same links, neighbours, FDB, routes and
route lookups (the scene of tests/netns/record_rtnl.py, on the host kernel)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute

from controlplane.kernel.netlink import NetlinkSocket
from controlplane.kernel.netns import entered
from controlplane.kernel.rtnl import codec, topology
from tests.netns.record_rtnl import LOOKUPS, build
from tests.unit.test_rtnl_oracle import oracle_link, oracle_lookup, oracle_neigh, oracle_route


@pytest.fixture
def ipr(netns: str) -> Iterator[Any]:
    build(netns)
    with entered(netns):
        sock = IPRoute()
    try:
        yield sock
    finally:
        sock.close()


def _pyroute2_dump(ipr: Any) -> codec.Caches:
    expected = codec.Caches()
    msgs = [
        *((oracle_link, m) for m in ipr.get_links()),
        *((oracle_neigh, m) for m in ipr.get_neighbours(family=socket.AF_INET)),
        *((oracle_neigh, m) for m in ipr.get_neighbours(family=socket.AF_INET6)),
        *((oracle_neigh, m) for m in ipr.get_neighbours(family=socket.AF_BRIDGE)),
        *((oracle_route, m) for m in ipr.get_routes(family=socket.AF_INET)),
        *((oracle_route, m) for m in ipr.get_routes(family=socket.AF_INET6)),
    ]
    for oracle, msg in msgs:
        change = oracle(msg["header"]["type"], msg)
        if change is not None:
            expected.add(change)
    return expected


def test_dump_matches_pyroute2(netns: str, ipr: Any) -> None:
    # The kernel adds entries of its own as the links come up (IPv6 multicast
    # neighbours, link-local routes): compare a pyroute2 dump only with ours
    # when our dumps before and after it agree, i.e. nothing moved meanwhile.
    with NetlinkSocket(socket.NETLINK_ROUTE, netns, operation="test dump") as nl:
        ours = topology.dump(nl, codec.DUMPS)
        for _ in range(50):
            expected = _pyroute2_dump(ipr)
            before, ours = ours, topology.dump(nl, codec.DUMPS)
            if before == ours:
                break
        else:
            pytest.fail("the namespace never stood still for one dump")
    assert ours == expected
    # The scene's cases are really there (not two empty dumps agreeing).
    assert {link.kind for link in ours.links.values()} >= {"bridge", "veth"}
    assert len(ours.fdb) >= 2 and len(ours.neighbours) >= 3
    assert any(len(state.multipath) == 2 for state in ours.routes.values())


def test_route_lookups_match_pyroute2(netns: str, ipr: Any) -> None:
    expected = {a: oracle_lookup(ipr.route("get", dst=a)[0]) for a in LOOKUPS}
    assert topology.lookup_routes(LOOKUPS, netns) == expected
    assert expected["192.0.2.7"].gateway == "2001:db8:1::9"  # RTA_VIA
    assert expected["10.0.1.1"].local


def test_snapshot_and_bridge_ports(netns: str, ipr: Any) -> None:
    topo = topology.snapshot((), netns)
    down = {link.name for link in topo.links.values() if not link.up}
    assert "p2" in down and "br0" not in down  # p2's peer is down: no carrier
    assert topology.bridge_ports("br0", netns) == ["p1", "p2"]
