"""Invalidation engine benchmark (pure: no kernel): per-event cost and memory at 100,000 flows.

A router with a routed wan (default gateway) and a bridge of 64 ports with
2,000 LAN hosts (neighbour + FDB entry each); N offloaded, masqueraded TCP
flows from LAN hosts to distinct-ish Internet hosts. Each event is timed from
``handle()`` through ``flush()`` (and, for route changes, the
``RoutesResolved`` round trip with an in-process LPM standing in for the
kernel's lookups): event → decision, not counting decoding or the kernel's
delete (``bench/bench_invalidation.py`` measures the whole path).

Baseline, same run: what ``kernel/ctnetlink/teardown.py`` does per event
without an index: re-resolve every flow's path with ``flowpath.resolve_paths``
and compare (the kernel's conntrack dump is not even counted).

Memory: tracemalloc of the engine's state after indexing, divided by flows
(the dumped ``Flow`` objects are dropped first: the engine keeps compact records).

Goal (issue 8): p99 well under 10 ms per event at 100,000 flows.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.core.events import (
    Event,
    FdbEntryChanged,
    FlowGone,
    FlowsDumped,
    FlowSeen,
    LinkChanged,
    NeighbourChanged,
    ResolveRoutes,
    RouteChanged,
    RoutesResolved,
    Snapshot,
    TearDownFlows,
)
from controlplane.core.flowpath import (
    IPS_OFFLOAD,
    CtTuple,
    Flow,
    Link,
    Route,
    Topology,
    resolve_paths,
)
from controlplane.core.invalidation import Engine

WAN, BR0, FIRST_PORT = 2, 3, 10
PORTS = 64
HOSTS = 2000
GATEWAY = "192.0.2.1"
ROUTER = "192.0.2.100"
IPS_SRC_NAT = 0x10


def host_ip(i: int) -> str:
    return f"10.0.{i // 250}.{i % 250 + 2}"


def host_mac(i: int, alt: int = 0) -> str:
    return f"02:00:00:{alt:02x}:{i >> 8:02x}:{i & 0xFF:02x}"


class World:
    def __init__(self) -> None:
        links = [Link(WAN, "wan", "veth"), Link(BR0, "br0", "bridge")]
        links += [Link(FIRST_PORT + p, f"p{p}", "veth", master=BR0) for p in range(PORTS)]
        self.links = {link.ifindex: link for link in links}
        self.neighbours = {(BR0, host_ip(i)): host_mac(i) for i in range(HOSTS)}
        self.neighbours[(WAN, GATEWAY)] = "02:ff:00:00:00:01"
        # Each host also has a second MAC learned on its port (a NIC swap / VRRP-like
        # change), so neighbour MAC changes resolve completely.
        self.fdb = {
            (BR0, 0, host_mac(i, alt)): FIRST_PORT + i % PORTS
            for i in range(HOSTS)
            for alt in (0, 1)
        }
        self.moved_lans: set[str] = set()  # /24s routed to wan by route events

    def topology(self) -> Topology:
        return Topology(
            links=dict(self.links), neighbours=dict(self.neighbours), fdb=dict(self.fdb)
        )

    def lookup(self, address: str) -> Route | None:
        if address == ROUTER:
            return Route(oif=None, local=True)
        if address.startswith("10.0."):
            if address.rsplit(".", 1)[0] in self.moved_lans:
                return Route(oif=WAN, gateway=GATEWAY)
            return Route(oif=BR0)
        return Route(oif=WAN, gateway=GATEWAY)


def make_flows(count: int, rng: random.Random, remotes: int = 0) -> list[Flow]:
    """``count`` flows from the LAN hosts to ``remotes`` Internet hosts (0: one each)."""
    flows = []
    for n in range(count):
        host = host_ip(n % HOSTS)
        r = n % remotes if remotes else n
        remote = f"198.{51 + r // 60000}.{r // 250 % 240}.{r % 250 + 1}"
        sport = 1024 + (n // HOSTS) % 60000  # (host, sport) unique: tuples never collide
        flows.append(
            Flow(
                orig=CtTuple(2, 6, host, remote, sport, 443),
                reply=CtTuple(2, 6, remote, ROUTER, 443, sport),
                id=n + 1,
                status=IPS_OFFLOAD | IPS_SRC_NAT,
            )
        )
    rng.shuffle(flows)
    return flows


def run(engine: Engine, world: World, event: Event) -> list[Flow]:
    """One event from handle() to its decision, route lookups answered in-process."""
    engine.handle(event)
    torn: list[Flow] = []
    actions = engine.flush()
    while actions:
        follow: list[Event] = []
        for action in actions:
            if isinstance(action, TearDownFlows):
                torn.extend(action.flows)
            elif isinstance(action, ResolveRoutes):
                routes = {a: world.lookup(a) for a in action.addresses}
                follow.append(RoutesResolved(routes=routes))
        for ev in follow:
            engine.handle(ev)
        actions = engine.flush()
    return torn


def build(
    count: int, rng: random.Random, remotes: int = 0
) -> tuple[Engine, World, list[Flow], float]:
    world = World()
    engine = Engine()
    flows = make_flows(count, rng, remotes)
    t = time.perf_counter()
    run(engine, world, Snapshot(topology=world.topology()))
    run(engine, world, FlowsDumped(flows=tuple(flows)))
    return engine, world, flows, time.perf_counter() - t


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=300, help="events per kind (>= 200)")
    parser.add_argument("--baseline-events", type=int, default=5)
    parser.add_argument(
        "--remotes",
        type=int,
        default=0,
        help="distinct Internet hosts (default: one per flow, the worst case for memory)",
    )
    parser.add_argument(
        "--no-freeze",
        action="store_true",
        help="skip gc.freeze() after the start-up dump (the agent should freeze: a full "
        "collection over 100,000 records pauses for tens of ms)",
    )
    args = parser.parse_args()
    rng = random.Random(8)

    # -- memory ---------------------------------------------------------------------
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine, world, dumped, index_time = build(args.flows, rng, args.remotes)
    gc.collect()
    with_flows = tracemalloc.get_traced_memory()[0]
    del dumped
    gc.collect()
    engine_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    remotes = f"{args.remotes:,}" if args.remotes else "one per flow"
    print(
        f"indexed {len(engine):,} flows ({HOSTS:,} LAN hosts, Internet hosts: {remotes}) "
        f"in {index_time:.2f} s (dump + route answers)"
    )
    print(
        f"engine state: {engine_bytes / 2**20:.1f} MiB = {engine_bytes / len(engine):.0f} B/flow "
        f"(the dump's Flow objects: {(with_flows - engine_bytes - before) / len(engine):.0f}"
        " B/flow more)",
        flush=True,
    )
    flows = [f for f, _, _ in engine.flows()]
    if not args.no_freeze:
        gc.collect()
        gc.freeze()

    # -- per-event cost ----------------------------------------------------------------
    def moves() -> Event:
        i = rng.randrange(HOSTS)
        key = (BR0, 0, host_mac(i))
        port = FIRST_PORT + (world.fdb[key] - FIRST_PORT + 1 + rng.randrange(PORTS - 1)) % PORTS
        world.fdb[key] = port
        return FdbEntryChanged(bridge=BR0, vlan=0, mac=host_mac(i), port=port)

    def refresh() -> Event:
        i = rng.randrange(HOSTS)
        port = world.fdb[(BR0, 0, host_mac(i))]
        return FdbEntryChanged(bridge=BR0, vlan=0, mac=host_mac(i), port=port)

    def neighbour() -> Event:
        i = rng.randrange(HOSTS)
        key = (BR0, host_ip(i))
        alt = 1 if world.neighbours[key] == host_mac(i) else 0
        world.neighbours[key] = host_mac(i, alt)
        world.fdb[(BR0, 0, host_mac(i, alt))] = world.fdb[(BR0, 0, host_mac(i, 1 - alt))]
        port = world.fdb[(BR0, 0, host_mac(i, alt))]
        run(engine, world, FdbEntryChanged(bridge=BR0, vlan=0, mac=host_mac(i, alt), port=port))
        return NeighbourChanged(ifindex=BR0, ip=host_ip(i), mac=host_mac(i, alt))

    def link_down() -> Event:
        port = world.links[FIRST_PORT + rng.randrange(PORTS)]
        world.links[port.ifindex] = Link(port.ifindex, port.name, "veth", master=BR0, up=False)
        return LinkChanged(link=world.links[port.ifindex])

    def route() -> Event:
        lan = f"10.0.{rng.randrange(HOSTS // 250)}"
        world.moved_lans ^= {lan}
        return RouteChanged(prefix=f"{lan}.0/24")

    def wan_route() -> Event:
        return RouteChanged(prefix=f"198.51.{rng.randrange(240)}.0/24")

    def flow_seen() -> Event:
        n = rng.randrange(10**6)
        host, remote, sport = host_ip(n % HOSTS), f"203.0.{n % 250}.{n % 199 + 1}", 1024 + n % 60000
        return FlowSeen(
            flow=Flow(
                orig=CtTuple(2, 6, host, remote, sport, 80),
                reply=CtTuple(2, 6, remote, ROUTER, 80, sport),
                id=10**7 + n,
                status=IPS_OFFLOAD,
            )
        )

    gone_pool = list(flows)
    rng.shuffle(gone_pool)

    def flow_gone() -> Event:
        return FlowGone(flow=gone_pool.pop())

    def restore() -> None:  # untimed: ports back up before torn flows are re-offloaded
        for ifindex, link in list(world.links.items()):
            if not link.up:
                world.links[ifindex] = Link(ifindex, link.name, "veth", master=BR0)
                run(engine, world, LinkChanged(link=world.links[ifindex]))

    kinds: list[tuple[str, Callable[[], Event]]] = [
        ("FDB move (port changes)", moves),
        ("FDB refresh (same port)", refresh),
        ("neighbour MAC change", neighbour),
        ("bridge port down", link_down),
        ("route change, LAN /24", route),
        ("route change, wan /24 (routed)", wan_route),
        ("conntrack flow seen (new)", flow_seen),
        ("conntrack flow gone", flow_gone),
    ]
    rows = []
    for name, make in kinds:
        times: list[float] = []
        cpu: list[float] = []
        torn_total = 0
        for _ in range(args.events):
            event = make()
            t, c = time.perf_counter(), time.process_time()
            torn = run(engine, world, event)
            cpu.append(time.process_time() - c)
            times.append(time.perf_counter() - t)
            torn_total += len(torn)
            restore()
            for flow in torn:  # re-offloaded: index it again (not timed)
                run(engine, world, FlowSeen(flow=flow))
        rows.append((name, times, cpu, torn_total / len(times)))

    # -- baseline: re-resolve every flow per event (no index) ---------------------------
    base_times = []
    addresses = {a for f in flows for a in (f.reply.src, f.orig.src)}
    for _ in range(args.baseline_events):
        moves()
        t = time.perf_counter()
        topology = Topology(
            links=world.links,
            neighbours=world.neighbours,
            fdb=world.fdb,
            routes={a: world.lookup(a) for a in addresses},
        )
        resolve_paths(topology, flows)
        base_times.append(time.perf_counter() - t)
    base = statistics.median(base_times)

    gc_note = "gc.freeze() after start-up" if not args.no_freeze else "no gc.freeze()"
    print(f"\nper event, {len(engine):,} flows indexed, {args.events} events per kind ({gc_note})")
    print(
        "event -> decision, route lookups answered in-process; wall clock, and CPU p99 "
        "(excludes time preempted by other processes); vs base = baseline / p99"
    )
    header = (
        f"{'event':32} {'p50 ms':>8} {'p99 ms':>8} {'cpu p99':>8} {'max ms':>8} {'torn/ev':>8} "
        f"{'us/torn':>8} {'vs base':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, times, cpu, torn_avg in rows:
        p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
        per_torn = f"{p50 / torn_avg * 1e6:8.1f}" if torn_avg else f"{'-':>8}"
        print(
            f"{name:32} {p50 * 1e3:8.3f} {p99 * 1e3:8.3f} {percentile(cpu, 0.99) * 1e3:8.3f} "
            f"{max(times) * 1e3:8.3f} {torn_avg:8.1f} {per_torn} {base / p99:7.0f}x"
        )
    print(
        f"{'baseline: re-resolve all flows':32} {base * 1e3:8.1f} {'':8} {'':8} "
        f"{max(base_times) * 1e3:8.1f} {'':8} {'':8} {'1':>7}x"
    )
    print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")

    # -- a burst: coalescing ----------------------------------------------------------
    burst = [moves() for _ in range(20_000)]
    t = time.perf_counter()
    for event in burst:
        engine.handle(event)
    actions = engine.flush()
    elapsed = time.perf_counter() - t
    teardowns = [a for a in actions if isinstance(a, TearDownFlows)]
    flows_out = sum(len(a.flows) for a in teardowns)
    print(
        f"\nburst of {len(burst):,} FDB moves: {elapsed * 1e3:.0f} ms "
        f"({elapsed / len(burst) * 1e6:.1f} us/event), {len(teardowns)} TearDownFlows "
        f"actions for {flows_out:,} distinct flows"
    )


if __name__ == "__main__":
    main()
