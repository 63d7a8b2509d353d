"""The flow-path resolver: table-driven topologies, then properties against a ground truth."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core.flowpath import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    IPS_OFFLOAD,
    CtTuple,
    Family,
    Flow,
    Link,
    Route,
    Topology,
    egress,
    egress_path,
    resolve_flow_path,
    resolve_paths,
    select_flows_through,
)

TCP = 6
UDP = 17

# One router used by most cases. Index → device:
#   1 lo
#   2 wan (veth, routed, default route via 192.0.2.254)
#   3 br0 (bridge, no VLAN filtering): ports 4 p1, 5 p2, 6 eth0.10 (VLAN 10 on 7 eth0)
#   8 br1 (VLAN-filtering bridge, pvid 1): ports 9 t1, 10 t2; 11 br1.20 (VLAN 20 on br1)
#   12 eth1; 13 eth1.100 (802.1ad on eth1); 14 eth1.100.10 (802.1Q on 13): routed QinQ
#   15 eth2; 16 eth2.200 (802.1ad); 17 eth2.200.30 (802.1Q): QinQ port of br0
LINKS = [
    Link(1, "lo"),
    Link(2, "wan", "veth"),
    Link(3, "br0", "bridge"),
    Link(4, "p1", "veth", master=3),
    Link(5, "p2", "veth", master=3),
    Link(6, "eth0.10", "vlan", master=3, lower=7, vlan_id=10),
    Link(7, "eth0", "veth"),
    Link(8, "br1", "bridge", vlan_filtering=True, pvid=1),
    Link(9, "t1", "veth", master=8),
    Link(10, "t2", "veth", master=8),
    Link(11, "br1.20", "vlan", lower=8, vlan_id=20),
    Link(12, "eth1", "veth"),
    Link(13, "eth1.100", "vlan", lower=12, vlan_id=100, vlan_protocol=ETH_P_8021AD),
    Link(14, "eth1.100.10", "vlan", lower=13, vlan_id=10),
    Link(15, "eth2", "veth"),
    Link(16, "eth2.200", "vlan", lower=15, vlan_id=200, vlan_protocol=ETH_P_8021AD),
    Link(17, "eth2.200.30", "vlan", master=3, lower=16, vlan_id=30),
]
NAMES = {link.name: link.ifindex for link in LINKS}

MAC = {name: f"02:00:00:00:00:{i:02x}" for i, name in enumerate("abcdefghij", start=1)}

# Hosts: address → (route, mac); the FDB puts each bridged host behind one port.
ROUTES = {
    "192.0.2.1": Route(oif=None, local=True),  # the router's wan address
    "10.0.1.1": Route(oif=None, local=True),
    "198.51.100.7": Route(oif=2, gateway="192.0.2.254"),  # internet host
    "10.0.1.2": Route(oif=3),  # behind p1
    "10.0.1.3": Route(oif=3),  # behind p2
    "10.0.1.4": Route(oif=3),  # behind eth0.10
    "10.0.1.5": Route(oif=3),  # behind the QinQ port eth2.200.30
    "10.0.1.9": Route(oif=3),  # neighbour known, FDB entry aged out
    "10.0.1.10": Route(oif=3),  # no neighbour entry at all
    "10.0.2.2": Route(oif=11),  # br1.20 → VLAN 20 on br1 → t1
    "10.0.3.2": Route(oif=8),  # br1 untagged → PVID 1 → t2
    "10.0.4.2": Route(oif=14),  # routed QinQ
    "2001:db8::2": Route(oif=3),  # IPv6 host behind p2
}
NEIGHBOURS = {
    (2, "192.0.2.254"): MAC["a"],
    (3, "10.0.1.2"): MAC["b"],
    (3, "10.0.1.3"): MAC["c"],
    (3, "10.0.1.4"): MAC["d"],
    (3, "10.0.1.5"): MAC["e"],
    (3, "10.0.1.9"): MAC["i"],
    (11, "10.0.2.2"): MAC["f"],
    (8, "10.0.3.2"): MAC["g"],
    (14, "10.0.4.2"): MAC["h"],
    (3, "2001:db8::2"): MAC["c"],
}
FDB = {
    (3, 0, MAC["b"]): 4,
    (3, 0, MAC["c"]): 5,
    (3, 0, MAC["d"]): 6,
    (3, 0, MAC["e"]): 17,
    (8, 20, MAC["f"]): 9,
    (8, 1, MAC["g"]): 10,
    (8, 0, MAC["g"]): 9,  # decoy: a filtering bridge must not look up VLAN 0
}
TOPO = Topology(
    links={link.ifindex: link for link in LINKS}, neighbours=NEIGHBOURS, fdb=FDB, routes=ROUTES
)


def names(devices: tuple[int, ...] | frozenset[int]) -> list[str]:
    return [TOPO.name(i) for i in devices]


EGRESS_CASES = [
    ("routed via gateway", "198.51.100.7", ["wan"], False),
    ("bridged", "10.0.1.2", ["br0", "p1"], False),
    ("bridged other port", "10.0.1.3", ["br0", "p2"], False),
    ("bridge port is a VLAN device", "10.0.1.4", ["br0", "eth0.10", "eth0"], False),
    ("bridge port is QinQ", "10.0.1.5", ["br0", "eth2.200.30", "eth2.200", "eth2"], False),
    ("VLAN device on a VLAN-filtering bridge", "10.0.2.2", ["br1.20", "br1", "t1"], False),
    ("VLAN-filtering bridge untagged: PVID", "10.0.3.2", ["br1", "t2"], False),
    ("routed QinQ", "10.0.4.2", ["eth1.100.10", "eth1.100", "eth1"], False),
    ("IPv6 bridged", "2001:db8::2", ["br0", "p2"], False),
    (
        "FDB aged out: every port",
        "10.0.1.9",
        ["br0", "p1", "p2", "eth0.10", "eth0", "eth2.200.30", "eth2.200", "eth2"],
        True,
    ),
    (
        "no neighbour: every port",
        "10.0.1.10",
        ["br0", "p1", "p2", "eth0.10", "eth0", "eth2.200.30", "eth2.200", "eth2"],
        True,
    ),
    ("local address: not forwarded", "192.0.2.1", [], False),
    ("no route", "203.0.113.1", [], False),
]


@pytest.mark.parametrize(
    ("address", "expected", "ambiguous"),
    [case[1:] for case in EGRESS_CASES],
    ids=[case[0] for case in EGRESS_CASES],
)
def test_egress_path(address: str, expected: list[str], ambiguous: bool) -> None:
    path = egress_path(TOPO, address)
    assert names(path.devices) == expected
    assert path.ambiguous is ambiguous
    assert bool(path.reason) is ambiguous


def tcp(src: str, dst: str, sport: int, dport: int) -> CtTuple:
    family = Family.IPV6 if ":" in src else Family.IPV4
    return CtTuple(family, TCP, src, dst, sport, dport)


def flow(orig: CtTuple, reply: CtTuple, **kw: int) -> Flow:
    return Flow(orig, reply, **kw)


FLOW_CASES = [
    (
        "masquerade: client behind p1 to the internet",
        flow(
            tcp("10.0.1.2", "198.51.100.7", 40000, 443),
            tcp("198.51.100.7", "192.0.2.1", 443, 40000),
        ),
        ["wan"],
        ["br0", "p1"],
    ),
    (
        "DNAT: internet to the server behind p2",
        flow(
            tcp("198.51.100.7", "192.0.2.1", 50000, 80),
            tcp("10.0.1.3", "198.51.100.7", 8080, 50000),
        ),
        ["br0", "p2"],
        ["wan"],
    ),
    (
        "bridge to bridge, no NAT",
        flow(tcp("10.0.1.2", "10.0.2.2", 1, 2), tcp("10.0.2.2", "10.0.1.2", 2, 1)),
        ["br1.20", "br1", "t1"],
        ["br0", "p1"],
    ),
    (
        "QinQ routed to a VLAN bridge port",
        flow(tcp("10.0.4.2", "10.0.1.4", 1, 2), tcp("10.0.1.4", "10.0.4.2", 2, 1)),
        ["br0", "eth0.10", "eth0"],
        ["eth1.100.10", "eth1.100", "eth1"],
    ),
    (
        "to the router itself: not forwarded",
        flow(tcp("10.0.1.2", "10.0.1.1", 1, 22), tcp("10.0.1.1", "10.0.1.2", 22, 1)),
        [],
        [],
    ),
    (
        "from the router itself: not forwarded",
        flow(tcp("192.0.2.1", "198.51.100.7", 1, 22), tcp("198.51.100.7", "192.0.2.1", 22, 1)),
        [],
        [],
    ),
    (
        "DNAT to the router itself (redirect): not forwarded",
        flow(tcp("10.0.1.2", "198.51.100.7", 1, 80), tcp("10.0.1.1", "10.0.1.2", 3128, 1)),
        [],
        [],
    ),
]


@pytest.mark.parametrize(
    ("f", "orig", "reply"), [c[1:] for c in FLOW_CASES], ids=[c[0] for c in FLOW_CASES]
)
def test_flow_path(f: Flow, orig: list[str], reply: list[str]) -> None:
    path = resolve_flow_path(TOPO, f)
    assert names(path.orig.devices) == orig
    assert names(path.reply.devices) == reply
    assert path.devices == {NAMES[n] for n in orig + reply}


def test_selection_by_device() -> None:
    flows = [c[1] for c in FLOW_CASES]
    paths = resolve_paths(TOPO, flows)
    masq, dnat, b2b, qinq, *_local = flows

    def sel(*devs: str) -> list[Flow]:
        return select_flows_through(flows, paths, {NAMES[d] for d in devs})

    assert sel("p1") == [masq, b2b]
    assert sel("p2") == [dnat]
    assert sel("wan") == [masq, dnat]
    assert sel("t1", "eth1") == [b2b, qinq]
    assert sel("br0") == [masq, dnat, b2b, qinq]
    assert sel("t2", "lo") == []
    assert sel() == []


def test_flow_status_and_missing_path() -> None:
    f = FLOW_CASES[0][1]
    assert not f.offloaded
    assert replace(f, status=IPS_OFFLOAD | 0x8).offloaded
    with pytest.raises(KeyError):
        select_flows_through([f], {}, {1})


def test_vlan_protocol_mismatch_uses_pvid() -> None:
    # An 802.1ad tag on a 802.1Q bridge is not the bridge's VLAN: the kernel
    # looks the MAC up in the PVID instead.
    links = {
        1: Link(1, "br", "bridge", vlan_filtering=True, pvid=7, vlan_protocol=ETH_P_8021Q),
        2: Link(2, "br.ad", "vlan", lower=1, vlan_id=20, vlan_protocol=ETH_P_8021AD),
        3: Link(3, "a", "veth", master=1),
        4: Link(4, "b", "veth", master=1),
    }
    topo = Topology(
        links=links,
        neighbours={(2, "10.0.0.2"): MAC["a"]},
        fdb={(1, 20, MAC["a"]): 3, (1, 7, MAC["a"]): 4},
        routes={"10.0.0.2": Route(oif=2)},
    )
    assert egress_path(topo, "10.0.0.2").devices == (2, 1, 4)


def test_inconsistent_snapshot_terminates() -> None:
    # A VLAN loop cannot exist in the kernel, but a racy snapshot must not hang us.
    links = {1: Link(1, "x", "vlan", lower=2, vlan_id=1), 2: Link(2, "y", "vlan", lower=1)}
    topo = Topology(links=links, routes={"10.0.0.1": Route(oif=1)})
    assert set(egress_path(topo, "10.0.0.1").devices) == {1, 2}


# --- properties against a generated ground truth ---------------------------------------------


@dataclass(frozen=True)
class World:
    """A generated router plus, for each host, the device chain it really sits behind."""

    topology: Topology
    hosts: dict[str, tuple[int, ...]]
    local: str


@st.composite
def worlds(draw: st.DrawFn) -> World:
    links: dict[int, Link] = {}
    neighbours: dict[tuple[int, str], str] = {}
    fdb: dict[tuple[int, int, str], int] = {}
    routes: dict[str, Route | None] = {}
    hosts: dict[str, tuple[int, ...]] = {}
    next_index = iter(range(2, 10_000))

    def add(**kw: Any) -> Link:
        index = next(next_index)
        link = Link(ifindex=index, name=f"d{index}", **kw)
        links[index] = link
        return link

    def lower_chain(qinq: bool, vlan: bool, **kw: Any) -> list[Link]:
        """A port or routed device, possibly VLAN (or QinQ) on top; top device first."""
        base = add(kind="veth", **({} if vlan or qinq else kw))
        if qinq:
            outer = add(kind="vlan", lower=base.ifindex, vlan_id=100, vlan_protocol=ETH_P_8021AD)
            inner = add(kind="vlan", lower=outer.ifindex, vlan_id=10, **kw)
            return [inner, outer, base]
        if vlan:
            return [add(kind="vlan", lower=base.ifindex, vlan_id=10, **kw), base]
        return [base]

    host_number = iter(range(1, 60_000))

    def host() -> tuple[str, str]:
        n = next(host_number)
        return f"10.{n >> 8}.{n & 255}.1", f"02:00:00:00:{n >> 8:02x}:{n & 255:02x}"

    for _ in range(draw(st.integers(1, 3))):  # bridges
        filtering = draw(st.booleans())
        bridge = add(kind="bridge", vlan_filtering=filtering, pvid=1 if filtering else None)
        ports = [
            lower_chain(draw(st.booleans()), draw(st.booleans()), master=bridge.ifindex)
            for _ in range(draw(st.integers(1, 4)))
        ]
        for chain in ports:
            for _ in range(draw(st.integers(0, 3))):
                address, mac = host()
                neighbours[(bridge.ifindex, address)] = mac
                fdb[(bridge.ifindex, 1 if filtering else 0, mac)] = chain[0].ifindex
                routes[address] = Route(oif=bridge.ifindex)
                hosts[address] = (bridge.ifindex, *(link.ifindex for link in chain))
    for _ in range(draw(st.integers(1, 3))):  # routed interfaces, each with a gateway
        chain = lower_chain(draw(st.booleans()), draw(st.booleans()))
        gateway, mac = host()
        neighbours[(chain[0].ifindex, gateway)] = mac
        for _ in range(draw(st.integers(1, 3))):
            address, _ = host()
            routes[address] = Route(oif=chain[0].ifindex, gateway=gateway)
            hosts[address] = tuple(link.ifindex for link in chain)
    local, _ = host()
    routes[local] = Route(oif=None, local=True)
    topology = Topology(links=links, neighbours=neighbours, fdb=fdb, routes=routes)
    return World(topology, hosts, local)


@st.composite
def world_and_flows(draw: st.DrawFn) -> tuple[World, list[Flow]]:
    world = draw(worlds())
    addresses = sorted(world.hosts)
    flows = []
    for sport in range(draw(st.integers(0, 25))):
        client = draw(st.sampled_from(addresses))
        server = draw(st.sampled_from(addresses))
        nat = draw(st.sampled_from(["none", "masquerade", "dnat", "to router", "from router"]))
        orig_dst, reply_dst = server, client
        if nat == "masquerade":
            reply_dst = world.local
        elif nat == "dnat":
            orig_dst = world.local
        elif nat == "to router":
            server = orig_dst = world.local
        elif nat == "from router":
            client = reply_dst = world.local
        flows.append(
            Flow(
                tcp(client, orig_dst, 1024 + sport, 80),
                tcp(server, reply_dst, 80, 1024 + sport),
                id=sport,
                zone=draw(st.integers(0, 3)),
            )
        )
    return world, flows


def truth(world: World, f: Flow) -> frozenset[int]:
    # The real endpoints are orig.src and reply.src whatever the NAT; a flow
    # with the router as an endpoint is not forwarded and uses no device.
    if world.local in (f.orig.src, f.reply.src):
        return frozenset()
    return frozenset(world.hosts[f.orig.src]) | frozenset(world.hosts[f.reply.src])


@settings(max_examples=200, deadline=None)
@given(world_and_flows(), st.data())
def test_selection_is_exact(wf: tuple[World, list[Flow]], data: st.DataObject) -> None:
    world, flows = wf
    devices = data.draw(st.sets(st.sampled_from(sorted(world.topology.links))))
    paths = resolve_paths(world.topology, flows)
    for f in flows:
        assert paths[f].devices == truth(world, f)
        assert not paths[f].ambiguous
    selected = select_flows_through(flows, paths, devices)
    assert selected == [f for f in flows if truth(world, f) & devices]


@settings(max_examples=100, deadline=None)
@given(world_and_flows(), st.data())
def test_selection_is_a_union_over_devices(
    wf: tuple[World, list[Flow]], data: st.DataObject
) -> None:
    world, flows = wf
    indexes = sorted(world.topology.links)
    a = data.draw(st.sets(st.sampled_from(indexes)))
    b = data.draw(st.sets(st.sampled_from(indexes)))
    paths = resolve_paths(world.topology, flows)
    sel_a = select_flows_through(flows, paths, a)
    sel_b = select_flows_through(flows, paths, b)
    sel_ab = select_flows_through(flows, paths, a | b)
    assert set(sel_ab) == set(sel_a) | set(sel_b)
    assert select_flows_through(sel_ab, paths, a) == sel_a  # order kept, subset


@settings(max_examples=100, deadline=None)
@given(world_and_flows(), st.data())
def test_missing_facts_only_widen_paths(wf: tuple[World, list[Flow]], data: st.DataObject) -> None:
    # Aged-out FDB entries and neighbours may make us tear down too much, never too little.
    world, flows = wf
    topo = world.topology
    fdb_keys = sorted(topo.fdb)
    neigh_keys = sorted(topo.neighbours)
    drop_fdb = data.draw(st.sets(st.sampled_from(fdb_keys))) if fdb_keys else set()
    drop_neigh = data.draw(st.sets(st.sampled_from(neigh_keys))) if neigh_keys else set()
    partial = replace(
        topo,
        fdb={k: v for k, v in topo.fdb.items() if k not in drop_fdb},
        neighbours={k: v for k, v in topo.neighbours.items() if k not in drop_neigh},
    )
    full_paths = resolve_paths(topo, flows)
    partial_paths = resolve_paths(partial, flows)
    for f in flows:
        assert partial_paths[f].devices >= full_paths[f].devices
        if partial_paths[f].devices != full_paths[f].devices:
            assert partial_paths[f].ambiguous


@settings(max_examples=50, deadline=None)
@given(world_and_flows())
def test_memoised_resolution_matches_single(wf: tuple[World, list[Flow]]) -> None:
    world, flows = wf
    paths = resolve_paths(world.topology, flows)
    assert paths == {f: resolve_flow_path(world.topology, f) for f in flows}


@settings(max_examples=100, deadline=None)
@given(worlds())
def test_egress_agrees_with_egress_path(world: World) -> None:
    """``egress`` (what the engine caches) walks the same chain as ``egress_path``."""
    topo = world.topology
    for address in [*world.hosts, world.local, "203.0.113.99"]:
        path, cached = egress_path(topo, address), egress(topo, address)
        assert cached.devices == path.devices
        assert cached.complete is not path.ambiguous
        assert cached.local is path.local
        assert cached.bridged is any(topo.links[d].kind == "bridge" for d in path.devices)
        route = topo.routes.get(address)
        if route is not None and route.oif is not None and not route.local:
            nexthop = route.gateway or address
            assert cached.neighbour == (route.oif, nexthop)
            assert cached.mac == topo.neighbours.get((route.oif, nexthop))


def test_egress_records_what_it_consulted() -> None:
    bridged = egress(TOPO, "10.0.1.2")
    assert (bridged.devices, bridged.mac, bridged.bridged) == ((3, 4), MAC["b"], True)
    assert bridged.fdb == ((3, 0, MAC["b"]),) and bridged.neighbour == (3, "10.0.1.2")
    routed = egress(TOPO, "198.51.100.7")
    assert (routed.bridged, routed.neighbour, routed.fdb) == (False, (2, "192.0.2.254"), ())
    aged = egress(TOPO, "10.0.1.9")
    assert not aged.complete and aged.fdb and aged.mac is not None
    down = Topology(
        links={**TOPO.links, 4: replace(TOPO.links[4], up=False)},
        neighbours=TOPO.neighbours,
        fdb=TOPO.fdb,
        routes=TOPO.routes,
    )
    assert egress(down, "10.0.1.2").down == (4,)
    left = Topology(
        links={**TOPO.links, 4: replace(TOPO.links[4], master=None)},
        neighbours=TOPO.neighbours,
        fdb=TOPO.fdb,
        routes=TOPO.routes,
    )
    assert not egress(left, "10.0.1.2").complete  # its FDB entries left with the port
