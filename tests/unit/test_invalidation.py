"""The invalidation engine: table-driven cases per event type, then a property test
against a brute-force reference (every flow re-resolved after every event)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.core.events import (
    AwaitNeighbour,
    Event,
    EventsLost,
    FdbEntryChanged,
    FdbEntryRemoved,
    FlowGone,
    FlowsDumped,
    FlowSeen,
    FlowsMarkedStale,
    LinkChanged,
    LinkRemoved,
    NeighbourChanged,
    NeighbourRemoved,
    NeighbourWaitExpired,
    ResolveRoutes,
    Resync,
    RouteChanged,
    RoutesResolved,
    Snapshot,
    TearDownFlows,
    TopologyChanged,
)
from controlplane.core.flowpath import (
    IPS_OFFLOAD,
    CtTuple,
    Egress,
    Flow,
    Link,
    NeighbourKey,
    Route,
    Topology,
    egress,
)
from controlplane.core.invalidation import TRANSITIONS, Engine, Policy, conn_key, judge

TCP = 6
WAN, BR0, P1, P2, P3, BR1, T1, T2, BR1_20, ETH0, ETH0_10 = 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13
MACS = [f"02:00:00:00:00:{i:02x}" for i in range(1, 7)]
GATEWAY = "192.0.2.1"
ROUTER_WAN = "192.0.2.100"


@dataclass
class World:
    """The kernel, as far as the engine sees it: caches plus a route table with LPM."""

    links: dict[int, Link] = field(default_factory=dict)
    neighbours: dict[tuple[int, str], str] = field(default_factory=dict)
    fdb: dict[tuple[int, int, str], int] = field(default_factory=dict)
    table: dict[str, Route] = field(default_factory=dict)  # prefix → route

    def lookup(self, address: str) -> Route | None:
        ip = ipaddress.ip_address(address)
        best: tuple[int, Route] | None = None
        for prefix, route in self.table.items():
            net = ipaddress.ip_network(prefix)
            if (
                ip.version == net.version
                and ip in net
                and (best is None or net.prefixlen > best[0])
            ):
                best = (net.prefixlen, route)
        return best[1] if best else None

    def topology(self, addresses: Iterable[str] = ()) -> Topology:
        return Topology(
            links=dict(self.links),
            neighbours=dict(self.neighbours),
            fdb=dict(self.fdb),
            routes={a: self.lookup(a) for a in addresses},
        )

    def apply(self, event: object) -> None:
        match event:
            case LinkChanged(link=link):
                self.links[link.ifindex] = link
            case LinkRemoved(ifindex=ifindex):
                self.links.pop(ifindex, None)
                # The kernel flushes the device's FDB and neighbour entries with it.
                for key in [k for k, p in self.fdb.items() if ifindex in (p, k[0])]:
                    del self.fdb[key]
                for nkey in [k for k in self.neighbours if k[0] == ifindex]:
                    del self.neighbours[nkey]
            case FdbEntryChanged(bridge=b, vlan=v, mac=m, port=p):
                self.fdb[(b, v, m)] = p
            case FdbEntryRemoved(bridge=b, vlan=v, mac=m):
                self.fdb.pop((b, v, m), None)
            case NeighbourChanged(ifindex=i, ip=ip, mac=m):
                self.neighbours[(i, ip)] = m
            case NeighbourRemoved(ifindex=i, ip=ip):
                self.neighbours.pop((i, ip), None)


def base_world() -> World:
    links = [
        Link(1, "lo"),
        Link(WAN, "wan", "veth"),
        Link(BR0, "br0", "bridge"),
        Link(P1, "p1", "veth", master=BR0),
        Link(P2, "p2", "veth", master=BR0),
        Link(P3, "p3", "veth", master=BR0),
        Link(BR1, "br1", "bridge", vlan_filtering=True, pvid=1),
        Link(T1, "t1", "veth", master=BR1),
        Link(T2, "t2", "veth", master=BR1),
        Link(BR1_20, "br1.20", "vlan", lower=BR1, vlan_id=20),
        Link(ETH0, "eth0", "veth"),
        Link(ETH0_10, "eth0.10", "vlan", lower=ETH0, vlan_id=10),
    ]
    return World(
        links={link.ifindex: link for link in links},
        neighbours={
            (WAN, GATEWAY): MACS[0],
            (BR0, "10.0.0.2"): MACS[1],
            (BR0, "10.0.0.3"): MACS[2],
            (BR1_20, "10.0.1.2"): MACS[3],
            (ETH0_10, "10.0.2.2"): MACS[4],
            (BR0, "2001:db8::2"): MACS[1],
        },
        fdb={
            (BR0, 0, MACS[1]): P1,
            (BR0, 0, MACS[2]): P2,
            (BR1, 20, MACS[3]): T1,
        },
        table={
            "0.0.0.0/0": Route(oif=WAN, gateway=GATEWAY),
            "10.0.0.0/24": Route(oif=BR0),
            "10.0.1.0/24": Route(oif=BR1_20),
            "10.0.2.0/24": Route(oif=ETH0_10),
            "2001:db8::/64": Route(oif=BR0),
            f"{ROUTER_WAN}/32": Route(oif=None, local=True),
        },
    )


def tcp_flow(
    src: str, dst: str, sport: int = 40000, *, masq: bool = False, dport: int = 443
) -> Flow:
    """A forwarded TCP flow from ``src`` to ``dst``; ``masq``: source NATed to the router."""
    family = 10 if ":" in src else 2
    reply_dst = ROUTER_WAN if masq else src
    return Flow(
        orig=CtTuple(family, TCP, src, dst, sport, dport),
        reply=CtTuple(family, TCP, dst, reply_dst, dport, sport),
        id=sport * 7,
        zone=0,
        mark=0,
        status=IPS_OFFLOAD | (0x10 if masq else 0),
    )


class Driver:
    """Runs the engine as the watcher would: handle, flush, answer route lookups."""

    def __init__(self, world: World, policy: Policy | None = None) -> None:
        self.world = world
        self.engine = Engine(policy)
        self.notices: list[FlowsMarkedStale] = []
        self.resyncs: list[Resync] = []
        self.topology: list[TopologyChanged] = []
        self.awaits: list[AwaitNeighbour] = []
        self.causes: list[str] = []  # of every flow torn down, in order
        self.send(Snapshot(topology=world.topology()))

    def send(self, *events: object) -> list[Flow]:
        """Apply ``events`` (world and engine) as one burst; returns the flows torn down."""
        for event in events:
            self.world.apply(event)
            self._collect(self.engine.handle(event))  # type: ignore[arg-type]
        torn: list[Flow] = []
        for _ in range(10):
            actions = self.engine.flush()
            if not actions:
                return torn
            for action in actions:
                if isinstance(action, TearDownFlows):
                    torn.extend(action.flows)
                    self.causes.extend(action.causes)
                elif isinstance(action, ResolveRoutes):
                    routes = {a: self.world.lookup(a) for a in action.addresses}
                    self._collect(self.engine.handle(RoutesResolved(routes=routes)))
                elif isinstance(action, AwaitNeighbour):
                    self.awaits.append(action)
        raise AssertionError("engine keeps asking for work")

    def _collect(self, actions: Sequence[object]) -> None:
        for action in actions:
            if isinstance(action, FlowsMarkedStale):
                self.notices.append(action)
            elif isinstance(action, Resync):
                self.resyncs.append(action)
            elif isinstance(action, TopologyChanged):
                self.topology.append(action)
            else:
                raise AssertionError(f"handle() returned {action!r}")


def keys(flows: Iterable[Flow]) -> set[tuple[int, CtTuple]]:
    return {(f.zone, f.orig) for f in flows}


LAN_HOST = tcp_flow("10.0.0.2", "198.51.100.7", masq=True)  # behind p1, out via wan
LAN_HOST_B = tcp_flow("10.0.0.3", "198.51.100.8", 40001, masq=True)  # behind p2
VLAN_HOST = tcp_flow("10.0.1.2", "198.51.100.9", 40002)  # br1.20 → br1 vlan 20 → t1
ROUTED_HOST = tcp_flow("10.0.2.2", "198.51.100.10", 40003)  # routed VLAN: neighbour xmit
V6_HOST = tcp_flow("2001:db8::2", "2001:db8:1::99", 40004)  # to p1; the far end unroutable
ALL = [LAN_HOST, LAN_HOST_B, VLAN_HOST, ROUTED_HOST, V6_HOST]


def started(policy: Policy | None = None) -> Driver:
    driver = Driver(base_world(), policy)
    assert driver.send(FlowsDumped(flows=tuple(ALL))) == []
    assert len(driver.engine) == len(ALL)
    return driver


LINK = base_world().links
# (name, events, expected torn-down flows, policy)
CASES: list[tuple[str, list[object], list[Flow], Policy | None]] = [
    (
        "FDB move (one NEWNEIGH, no delete)",
        [FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P3)],
        [LAN_HOST, V6_HOST],
        None,
    ),
    (
        "FDB refresh on the same port",
        [FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P1)],
        [],
        None,
    ),
    (
        "FDB entry aged out: not a move",
        [FdbEntryRemoved(bridge=BR0, vlan=0, mac=MACS[1])],
        [],
        None,
    ),
    (
        "FDB aged out, relearned on another port",
        [
            FdbEntryRemoved(bridge=BR0, vlan=0, mac=MACS[1]),
            FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P2),
        ],
        [LAN_HOST, V6_HOST],
        None,
    ),
    (
        "FDB aged out, relearned on the same port",
        [
            FdbEntryRemoved(bridge=BR0, vlan=0, mac=MACS[1]),
            FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P1),
        ],
        [],
        None,
    ),
    (
        "FDB move on a VLAN-filtering bridge, right VLAN",
        [FdbEntryChanged(bridge=BR1, vlan=20, mac=MACS[3], port=T2)],
        [VLAN_HOST],
        None,
    ),
    (
        "FDB entry on another VLAN: irrelevant",
        [FdbEntryChanged(bridge=BR1, vlan=1, mac=MACS[3], port=T2)],
        [],
        None,
    ),
    (
        "neighbour MAC change behind a bridge",
        [NeighbourChanged(ifindex=BR0, ip="10.0.0.3", mac=MACS[5])],
        [LAN_HOST_B],
        None,
    ),
    (
        "neighbour gone behind a bridge",
        [NeighbourRemoved(ifindex=BR0, ip="10.0.0.3")],
        [LAN_HOST_B],
        None,
    ),
    (
        "routed neighbour MAC change heals by itself",
        [NeighbourChanged(ifindex=ETH0_10, ip="10.0.2.2", mac=MACS[5])],
        [],
        None,
    ),
    (
        "routed neighbour MAC change, all_paths policy",
        [NeighbourChanged(ifindex=ETH0_10, ip="10.0.2.2", mac=MACS[5])],
        [ROUTED_HOST],
        Policy(all_paths=True),
    ),
    (
        "gateway MAC change: wan is routed",
        [NeighbourChanged(ifindex=WAN, ip=GATEWAY, mac=MACS[5])],
        [],
        None,
    ),
    (
        "bridge port down",
        [LinkChanged(link=replace(LINK[P1], up=False))],
        [LAN_HOST, V6_HOST],
        None,
    ),
    (
        "port left the bridge",
        [LinkChanged(link=replace(LINK[P2], master=None))],
        [LAN_HOST_B],
        None,
    ),
    ("unused port removed", [LinkRemoved(ifindex=P3)], [], None),
    ("bridge port removed", [LinkRemoved(ifindex=P1)], [LAN_HOST, V6_HOST], None),
    ("routed device removed: heals", [LinkRemoved(ifindex=ETH0_10)], [], None),
    (
        "routed device removed, exhaustive policy",
        [LinkRemoved(ifindex=ETH0_10)],
        [ROUTED_HOST],
        Policy(exhaustive_links=True),
    ),
    (
        "new port joins the bridge",
        [LinkChanged(link=Link(30, "p4", "veth", master=BR0))],
        [],
        None,
    ),
    (
        "route for a LAN moves to a routed device",
        [("route", "10.0.0.0/25", Route(oif=ETH0))],
        [LAN_HOST, LAN_HOST_B],
        None,
    ),
    (
        "more specific route, same egress",
        [("route", "10.0.0.2/32", Route(oif=BR0))],
        [],
        None,
    ),
    (
        "wan route change: routed, heals",
        [("route", "198.51.100.0/24", Route(oif=ETH0, gateway="10.9.9.9"))],
        [],
        None,
    ),
    (
        "bridged destination behind a new route",
        [("route", "198.51.100.7/32", Route(oif=BR0, gateway="10.0.0.3"))],
        [],
        None,
    ),
    ("route removed: unroutable", [("route", "10.0.0.0/24", None)], [LAN_HOST, LAN_HOST_B], None),
    (
        "flow gone before the event",
        [
            FlowGone(flow=LAN_HOST),
            FdbEntryRemoved(bridge=BR0, vlan=0, mac=MACS[1]),
            FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P3),
        ],
        [V6_HOST],
        None,
    ),
]


def route_event(world: World, prefix: str, route: Route | None) -> RouteChanged:
    if route is None:
        world.table.pop(prefix, None)
    else:
        world.table[prefix] = route
    return RouteChanged(prefix=prefix)


@pytest.mark.parametrize(
    ("events", "expected", "policy"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_event_table(events: list[object], expected: list[Flow], policy: Policy | None) -> None:
    driver = started(policy)
    real = [route_event(driver.world, *e[1:]) if isinstance(e, tuple) else e for e in events]
    torn = driver.send(*real)
    assert sorted(keys(torn), key=str) == sorted(keys(expected), key=str)
    assert len(torn) == len(keys(torn)), "deduplicated"
    assert len(driver.engine) == len(ALL) - len(torn) - sum(isinstance(e, FlowGone) for e in real)
    noticed = keys(f for n in driver.notices for f in n.flows)
    assert noticed == keys(torn)


def test_torn_down_flows_are_exact_and_forgotten() -> None:
    driver = started()
    torn = driver.send(FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P3))
    assert sorted(torn, key=str) == sorted([LAN_HOST, V6_HOST], key=str)  # tuples, id, status
    # Moving again: the flows were forgotten; their re-offload is a new FlowSeen.
    assert driver.send(FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P2)) == []
    assert driver.send(FlowSeen(flow=LAN_HOST)) == []
    assert driver.send(FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P1)) == [LAN_HOST]


def test_new_entry_under_an_indexed_tuple_replaces_it() -> None:
    # Its DESTROY unseen (nf_conntrack_events=2, or lost), the old entry's tuple
    # came back under a new id: a teardown must name the live entry.
    driver = started()
    reborn = replace(LAN_HOST, id=LAN_HOST.id + 1)
    assert driver.send(FlowSeen(flow=reborn)) == []
    assert len(driver.engine) == len(ALL)
    torn = driver.send(FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P3))
    assert sorted(torn, key=str) == sorted([reborn, V6_HOST], key=str)


def test_flow_without_offload_is_dropped() -> None:
    driver = started()
    driver.send(FlowSeen(flow=replace(LAN_HOST, status=0)))
    assert driver.send(FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P3)) == [V6_HOST]


def test_burst_is_coalesced_and_batched() -> None:
    driver = started(Policy(batch=2))
    events: list[Event] = [
        FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=p) for p in (P2, P3, P1) * 5
    ]
    events += [
        NeighbourRemoved(ifindex=BR0, ip="10.0.0.3"),
        LinkChanged(link=replace(LINK[P1], up=False)),
    ]
    for event in events:
        driver.world.apply(event)
        driver.engine.handle(event)
    actions = driver.engine.flush()
    teardowns = [a for a in actions if isinstance(a, TearDownFlows)]
    flows = [f for a in teardowns for f in a.flows]
    assert keys(flows) == keys([LAN_HOST, V6_HOST, LAN_HOST_B]) and len(flows) == 3
    assert [len(a.flows) for a in teardowns] == [2, 1]
    assert driver.engine.flush() == []


def test_route_change_asks_only_for_addresses_inside_the_prefix() -> None:
    driver = started()
    driver.engine.handle(route_event(driver.world, "10.0.0.0/24", Route(oif=BR0)))
    (ask,) = driver.engine.flush()
    assert isinstance(ask, ResolveRoutes)
    assert sorted(ask.addresses) == ["10.0.0.2", "10.0.0.3"]
    driver.engine.handle(route_event(driver.world, "0.0.0.0/0", Route(oif=WAN, gateway=GATEWAY)))
    (ask,) = driver.engine.flush()
    assert isinstance(ask, ResolveRoutes) and len(ask.addresses) == 8


def test_events_lost_asks_for_resync_and_snapshot_finds_lost_changes() -> None:
    driver = started()
    assert driver.engine.handle(EventsLost(source="rtnl")) == [Resync(source="rtnl")]
    driver.world.fdb[(BR0, 0, MACS[1])] = P2  # the move whose event was lost
    driver.world.neighbours[(BR0, "10.0.0.3")] = MACS[5]
    driver.world.table["10.0.1.0/24"] = Route(oif=ETH0)
    torn = driver.send(Snapshot(topology=driver.world.topology()))
    assert keys(torn) == keys([LAN_HOST, V6_HOST, LAN_HOST_B, VLAN_HOST])


def test_every_event_type_has_a_transition() -> None:
    from controlplane.core import events

    kinds = set(events.Event.__args__)
    assert kinds == set(TRANSITIONS)
    with pytest.raises(TypeError, match="not an invalidation event"):
        Engine().handle(ResolveRoutes(addresses=()))  # type: ignore[arg-type]


def test_judge_rules() -> None:
    p = Policy()
    a = Egress(
        devices=(BR0, P1), mac=MACS[1], bridged=True, neighbour=(BR0, "x"), fdb=((BR0, 0, MACS[1]),)
    )
    moved = replace(a, devices=(BR0, P2))
    aged = replace(a, devices=(BR0, P1, P2, P3), complete=False)
    down = replace(a, down=(P1,))
    assert judge(None, a, p) == (None, a)
    assert judge(a, a, p) == (None, a)
    assert judge(a, moved, p) == ("egress changed", moved)
    assert judge(a, aged, p) == (None, a)
    assert judge(a, replace(aged, down=(P2,)), p) == (None, a)  # another port went down
    assert judge(a, replace(aged, down=(P1,)), p)[0] == "device 4 down or gone"
    assert judge(a, replace(aged, mac=None), p)[0] == "neighbour gone"
    assert judge(a, down, p)[0] == "device 4 down or gone"
    assert judge(down, down, p) == (None, down)  # already down when cached: no change
    routed = Egress(devices=(ETH0,), mac=MACS[4], neighbour=(ETH0, "y"))
    relearned = replace(routed, mac=MACS[5])
    assert judge(routed, relearned, p) == (None, relearned)
    assert judge(routed, relearned, Policy(all_paths=True))[0] == "egress changed"
    gone = replace(routed, down=(ETH0,))
    assert judge(routed, gone, p) == (None, gone)
    assert judge(routed, gone, Policy(exhaustive_links=True))[0] == "device 12 down or gone"
    # The route moved to a next hop on a bridge whose neighbour is unresolved: wait.
    other = replace(a, mac=None, neighbour=(BR0, "z"), fdb=(), complete=False)
    assert judge(a, other, p) == (None, a)
    assert judge(a, other, p, wait=False) == ("neighbour gone", other)
    assert judge(a, replace(other, down=(P1,)), p)[0] == "device 4 down or gone"
    routed_other = Egress(devices=(ETH0,), neighbour=(ETH0, "z"))  # heals by itself: no wait
    assert judge(a, routed_other, p) == ("neighbour gone", routed_other)
    v6_other = replace(other, neighbour=(BR0, "2001:db8::9"))  # resolves after the teardown
    assert judge(a, v6_other, p) == ("neighbour gone", v6_other)


# -- the next hop moves to a neighbour not resolved yet (issue 20) -------------------

NEW_HOP = "10.0.0.4"  # on br0, no neighbour entry yet
FAR = tcp_flow("10.0.0.2", "203.0.113.9", 40010)  # the far end behind a next hop on br0


def via_next_hop() -> Driver:
    """FAR's far end routed via 10.0.0.3 (resolved, behind p2) on br0: direct transmit."""
    world = base_world()
    world.table["203.0.113.0/24"] = Route(oif=BR0, gateway="10.0.0.3")
    driver = Driver(world)
    assert driver.send(FlowSeen(flow=FAR)) == []
    return driver


def move_route(driver: Driver) -> list[Flow]:
    return driver.send(route_event(driver.world, "203.0.113.0/24", Route(oif=BR0, gateway=NEW_HOP)))


def resolve(driver: Driver) -> list[Flow]:
    driver.world.fdb[(BR0, 0, MACS[5])] = P3
    return driver.send(NeighbourChanged(ifindex=BR0, ip=NEW_HOP, mac=MACS[5]))


def test_route_to_an_unresolved_next_hop_waits_for_its_neighbour() -> None:
    driver = via_next_hop()
    assert move_route(driver) == []  # still on the path it cached, until the hop resolves
    assert driver.awaits == [AwaitNeighbour(ifindex=BR0, ip=NEW_HOP)]
    assert keys(resolve(driver)) == keys([FAR])
    assert driver.causes == [f"neighbour 10.0.0.4 on br0 is {MACS[5]}: egress changed"]


def test_a_next_hop_that_stays_unresolved_is_not_waited_for_forever() -> None:
    driver = via_next_hop()
    move_route(driver)
    expired = NeighbourWaitExpired(ifindex=BR0, ip=NEW_HOP)
    assert keys(driver.send(expired)) == keys([FAR])
    assert driver.causes == ["next hop 10.0.0.4 on br0 still unresolved: neighbour gone"]
    assert driver.send(expired) == []  # once


def test_issue_20_order_teardown_then_neighbour_then_the_flow_is_back() -> None:
    """Torn down with the next hop unresolved; the neighbour appears; only then the
    entry (re-created, new id) is seen and its route resolved: the kernel may have
    re-offloaded it before the neighbour was valid, so it is torn down once more."""
    driver = via_next_hop()
    move_route(driver)
    driver.send(NeighbourWaitExpired(ifindex=BR0, ip=NEW_HOP))
    assert resolve(driver) == []  # nothing indexed uses it yet
    back = replace(FAR, id=FAR.id + 1)
    assert keys(driver.send(FlowSeen(flow=back))) == keys([back])
    assert driver.causes[-1] == "next hop 10.0.0.4 on br0 changed after the teardown"
    again = replace(back, id=back.id + 1)  # re-offloaded after the neighbour: left alone
    assert driver.send(FlowSeen(flow=again)) == []
    assert len(driver.engine) == 1


def test_a_flow_back_before_its_next_hop_resolves_is_judged_when_it_does() -> None:
    driver = via_next_hop()
    move_route(driver)
    driver.send(NeighbourWaitExpired(ifindex=BR0, ip=NEW_HOP))
    back = replace(FAR, id=FAR.id + 1)
    assert driver.send(FlowSeen(flow=back)) == []
    assert keys(resolve(driver)) == keys([back])


def test_the_entry_a_packet_picked_up_from_the_other_side_is_the_same_connection() -> None:
    driver = via_next_hop()
    move_route(driver)
    driver.send(NeighbourWaitExpired(ifindex=BR0, ip=NEW_HOP))
    resolve(driver)
    o = FAR.orig
    picked = Flow(
        orig=replace(o, src=o.dst, dst=o.src, sport=o.dport, dport=o.sport),
        reply=o,
        id=99,
        status=IPS_OFFLOAD,
    )
    assert conn_key(picked) == conn_key(FAR)
    assert keys(driver.send(FlowSeen(flow=picked))) == keys([picked])


# -- property: the engine equals a brute-force reference --------------------------------


class Reference:
    """Every indexed flow re-resolved with flowpath after every event; same rule (judge).

    Plus the re-check after a teardown, by its definition: a connection torn down in
    one burst whose entry comes back after a neighbour entry of its egress appeared or
    changed in a *later* burst is torn down again when seen (the kernel may have
    re-offloaded it before that neighbour was valid). ``epoch`` counts bursts (sends).
    """

    def __init__(self, world: World, policy: Policy) -> None:
        self.world, self.policy = world, policy
        self.cached: dict[tuple[int, CtTuple], tuple[Flow, Egress, Egress]] = {}
        self.epoch = 0
        self.torn: dict[object, int] = {}
        self.neighbour_epoch: dict[NeighbourKey, int] = {}

    def _egress(self, address: str) -> Egress:
        return egress(self.world.topology([address]), address)

    def neighbours_changed(self, before: dict[NeighbourKey, str]) -> None:
        """The world's neighbours changed from ``before`` during this burst."""
        for key in before.keys() - self.world.neighbours.keys():
            self.neighbour_epoch.pop(key, None)
        for key, mac in self.world.neighbours.items():
            if before.get(key) != mac:
                self.neighbour_epoch[key] = self.epoch

    def tore(self, flows: Iterable[Flow]) -> None:
        for flow in flows:
            self.torn[conn_key(flow)] = self.epoch

    def see(self, flow: Flow) -> set[tuple[int, CtTuple]]:
        """Index ``flow``; returns its key if it is torn down on sight."""
        key = (flow.zone, flow.orig)
        known = self.cached.get(key)
        if not flow.offloaded:
            self.cached.pop(key, None)
            return set()
        if known is not None and (known[0].id, known[0].reply) == (flow.id, flow.reply):
            return set()
        orig, reply = self._egress(flow.reply.src), self._egress(flow.orig.src)
        torn = self.torn.pop(conn_key(flow), None)
        if torn is not None and any(
            e.neighbour is not None
            and (e.bridged or self.policy.all_paths)
            and self.neighbour_epoch.get(e.neighbour, -1) > torn
            for e in (orig, reply)
        ):
            self.cached.pop(key, None)
            self.tore([flow])
            return {key}
        self.cached[key] = (flow, orig, reply)
        return set()

    def stale_after_event(self, expired: NeighbourKey | None = None) -> set[tuple[int, CtTuple]]:
        stale: set[tuple[int, CtTuple]] = set()
        for key, (flow, orig, reply) in list(self.cached.items()):
            now_o, now_r = self._egress(flow.reply.src), self._egress(flow.orig.src)
            why_o, keep_o = judge(orig, now_o, self.policy, wait=now_o.neighbour != expired)
            why_r, keep_r = judge(reply, now_r, self.policy, wait=now_r.neighbour != expired)
            if why_o or why_r:
                stale.add(key)
                del self.cached[key]
                self.tore([flow])
            else:
                assert keep_o is not None and keep_r is not None
                self.cached[key] = (flow, keep_o, keep_r)
        return stale


ADDRESSES = [
    "10.0.0.2",
    "10.0.0.3",
    "10.0.0.4",
    "10.0.1.2",
    "10.0.2.2",
    "198.51.100.7",
    "198.51.100.8",
    "10.0.0.130",
]
PREFIXES = [
    "0.0.0.0/0",
    "10.0.0.0/24",
    "10.0.0.0/25",
    "10.0.0.128/25",
    "10.0.0.2/32",
    "198.51.100.0/24",
    "10.0.1.0/24",
]
ROUTES = [
    None,
    Route(oif=BR0),
    Route(oif=BR1_20),
    Route(oif=ETH0_10),
    Route(oif=WAN, gateway=GATEWAY),
    Route(oif=BR0, gateway="10.0.0.3"),
    Route(oif=BR1, gateway="10.0.1.2"),
    Route(oif=BR0, gateway="10.0.0.4"),  # a next hop without a neighbour entry (yet)
    Route(oif=None, local=True),
]
NEIGH_IPS = ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.1.2", "10.0.2.2", GATEWAY, "198.51.100.7"]
DEVICES = [WAN, BR0, P1, P2, P3, BR1, T1, T2, BR1_20, ETH0, ETH0_10]


@st.composite
def world_event(
    draw: st.DrawFn, world: World, flows: list[Flow], back: Sequence[Flow] = ()
) -> object:
    kind = draw(
        st.sampled_from(
            [
                "fdb",
                "fdb",
                "fdb-",
                "neigh",
                "neigh-",
                "link",
                "link-",
                "route",
                "flow",
                "flow",
                "gone",
                "unoffload",
                "again",
                "again",
                "expire",
            ]
        )
    )
    mac = draw(st.sampled_from(MACS))
    if kind == "fdb":
        bridge = draw(st.sampled_from([BR0, BR1]))
        return FdbEntryChanged(
            bridge=bridge,
            vlan=draw(st.sampled_from([0, 1, 20])),
            mac=mac,
            port=draw(st.sampled_from(DEVICES)),
        )
    if kind == "fdb-":
        if not world.fdb:
            return FdbEntryRemoved(bridge=BR0, vlan=0, mac=mac)
        b, v, m = draw(st.sampled_from(sorted(world.fdb)))
        return FdbEntryRemoved(bridge=b, vlan=v, mac=m)
    if kind in ("neigh", "neigh-"):
        ifindex = draw(st.sampled_from([BR0, BR1, BR1_20, ETH0_10, WAN]))
        ip = draw(st.sampled_from(NEIGH_IPS))
        hops: list[NeighbourKey] = []
        for flow in back:
            for address in (flow.reply.src, flow.orig.src):
                hop = egress(world.topology([address]), address).neighbour
                if hop is not None:
                    hops.append(hop)
        use_hop: bool = bool(hops) and draw(st.booleans())
        if use_hop:
            # The next hop of a torn-down flow: the order of issue 20 (teardown, then
            # its neighbour appears or changes, then the entry is back).
            ifindex, ip = draw(st.sampled_from(hops))
        if kind == "neigh":
            return NeighbourChanged(ifindex=ifindex, ip=ip, mac=mac)
        return NeighbourRemoved(ifindex=ifindex, ip=ip)
    if kind == "link":
        ifindex = draw(st.sampled_from(DEVICES))
        old = world.links.get(ifindex) or Link(ifindex, f"if{ifindex}", "veth")
        change = draw(st.sampled_from(["up", "master", "pvid", "filtering"]))
        if change == "up":
            new = replace(old, up=not old.up)
        elif change == "master":
            new = replace(old, master=draw(st.sampled_from([None, BR0, BR1])))
        elif change == "pvid":
            new = replace(old, pvid=draw(st.sampled_from([1, 20])))
        else:
            new = replace(old, vlan_filtering=not old.vlan_filtering)
        return LinkChanged(link=new)
    if kind == "link-":
        return LinkRemoved(ifindex=draw(st.sampled_from(DEVICES)))
    if kind == "route":
        return ("route", draw(st.sampled_from(PREFIXES)), draw(st.sampled_from(ROUTES)))
    if kind == "expire":
        return NeighbourWaitExpired(
            ifindex=draw(st.sampled_from([BR0, BR1, BR1_20])), ip=draw(st.sampled_from(NEIGH_IPS))
        )
    if kind == "again" and back:  # a torn-down entry is back (re-created: new id)
        flow = draw(st.sampled_from(list(back)))
        return FlowSeen(flow=replace(flow, id=flow.id + draw(st.integers(1, 3))))
    if kind == "flow" or not flows:
        src = draw(st.sampled_from(ADDRESSES))
        dst = draw(st.sampled_from(ADDRESSES))
        return FlowSeen(
            flow=tcp_flow(src, dst, draw(st.integers(1024, 1100)), masq=draw(st.booleans()))
        )
    flow = draw(st.sampled_from(flows))
    if kind == "gone":
        return FlowGone(flow=flow)
    if kind == "again":  # a new entry under the same tuple (the old one died unseen)
        return FlowSeen(flow=replace(flow, id=flow.id + draw(st.integers(1, 3))))
    return FlowSeen(flow=replace(flow, status=0))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.data(), st.sampled_from([Policy(), Policy(all_paths=True), Policy(exhaustive_links=True)])
)
def test_engine_matches_brute_force(data: st.DataObject, policy: Policy) -> None:
    world = base_world()
    driver = Driver(world, policy)
    reference = Reference(world, policy)
    seen: list[Flow] = []
    back: list[Flow] = []  # torn down: their entries come back (re-created)
    for _ in range(data.draw(st.integers(5, 40))):
        if data.draw(st.integers(0, 9)) == 0:
            resync_after_lost_events(data, driver, reference)
            continue
        event = data.draw(world_event(world, seen, back))
        if isinstance(event, tuple):
            event = route_event(world, *event[1:])
        before = dict(world.neighbours)
        expected: set[tuple[int, CtTuple]] = set()
        if isinstance(event, FlowSeen):
            expected = reference.see(event.flow)
            seen.append(event.flow)
        elif isinstance(event, FlowGone):
            reference.cached.pop((event.flow.zone, event.flow.orig), None)
        torn = driver.send(event)
        reference.neighbours_changed(before)
        if isinstance(event, NeighbourWaitExpired):
            expected = reference.stale_after_event((event.ifindex, event.ip))
        elif not isinstance(event, FlowSeen | FlowGone):
            expected = reference.stale_after_event()
        reference.epoch += 1
        back = (back + torn)[-8:]
        assert keys(torn) == expected, event
        assert len(torn) == len(keys(torn))
        # The engine's cached egresses are the reference's, flow by flow.
        listed = list(driver.engine.flows())
        mine = {(f.zone, f.orig): (f, o, r) for f, o, r in listed}
        assert mine == reference.cached
        assert len(listed) == len(driver.engine) == len(mine)


def resync_after_lost_events(data: st.DataObject, driver: Driver, reference: Reference) -> None:
    """Topology changes whose events were lost, then EventsLost + Snapshot: nothing is missed.

    The engine replays the snapshot's differences one by one, so an
    intermediate state may condemn a flow the end state alone would spare:
    the property is "no stale flow missed", plus exact agreement on the rest.
    """
    world = driver.world
    before = dict(world.neighbours)
    for _ in range(data.draw(st.integers(1, 5))):
        lost = data.draw(world_event(world, []))
        if isinstance(lost, tuple):
            route_event(world, *lost[1:])  # changes the table; the event is dropped
        elif not isinstance(lost, FlowSeen | FlowGone):
            world.apply(lost)
    assert driver.engine.handle(EventsLost(source="rtnl")) == [Resync(source="rtnl")]
    torn_flows = driver.send(Snapshot(topology=world.topology()))
    torn = keys(torn_flows)
    reference.neighbours_changed(before)
    missed = reference.stale_after_event() - torn
    assert not missed
    reference.tore(torn_flows)  # what the engine tore down, the reference too
    for key in torn:
        reference.cached.pop(key, None)
    reference.epoch += 1
    mine = {(f.zone, f.orig): (f, o, r) for f, o, r in driver.engine.flows()}
    assert mine == reference.cached


def test_torn_down_connections_remembered_are_bounded() -> None:
    driver = Driver(base_world(), Policy(remember=1))
    driver.send(FlowsDumped(flows=(LAN_HOST, V6_HOST)))
    assert len(driver.engine) == 2
    # Both behind p1: torn down by its move; only the newest is remembered.
    torn = driver.send(FdbEntryChanged(bridge=BR0, vlan=0, mac=MACS[1], port=P3))
    assert keys(torn) == keys([LAN_HOST, V6_HOST])
    driver.send(NeighbourChanged(ifindex=BR0, ip="10.0.0.2", mac=MACS[5]))
    driver.send(NeighbourChanged(ifindex=BR0, ip="2001:db8::2", mac=MACS[5]))
    back = [replace(f, id=f.id + 1) for f in torn]
    rechecked = [f for f in back if driver.send(FlowSeen(flow=f))]
    assert len(rechecked) == 1 and rechecked[0].orig == torn[-1].orig


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_topology_changed_is_noticed_exactly_when_the_links_change(data: st.DataObject) -> None:
    driver = started()
    assert len(driver.topology) == 1  # the first snapshot filled the link cache
    assert driver.topology[0].links == driver.engine.topology().links
    for _ in range(data.draw(st.integers(1, 25))):
        event = data.draw(world_event(driver.world, list(ALL)))
        if isinstance(event, tuple):
            event = route_event(driver.world, *event[1:])
        before = dict(driver.engine.topology().links)
        noticed = len(driver.topology)
        driver.send(event)
        after = dict(driver.engine.topology().links)
        assert len(driver.topology) == noticed + (before != after)
        if before != after:
            assert driver.topology[-1].links == after


def test_flush_hands_out_teardowns_before_route_lookups() -> None:
    driver = started()
    driver.world.apply(NeighbourRemoved(ifindex=BR0, ip="10.0.0.3"))
    driver.engine.handle(NeighbourRemoved(ifindex=BR0, ip="10.0.0.3"))
    driver.engine.handle(route_event(driver.world, "0.0.0.0/0", Route(oif=WAN, gateway=GATEWAY)))
    kinds = [type(a) for a in driver.engine.flush()]
    assert kinds == [TearDownFlows, ResolveRoutes]
