"""Tear down exactly the flows whose path uses some devices.

The wiring of the flow-path resolver: dump conntrack, snapshot the topology
(routes only for the addresses the flows need), resolve each flow's path with
the pure :mod:`controlplane.core.flowpath`, delete the matching entries.

Used when devices leave a flowtable (the kernel leaves their offloaded flows
in place) and, later, for cache invalidation (moved MAC, changed neighbour or
route): in every case "which flows use these devices" is the question.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from controlplane.core.flowpath import (
    Flow,
    flow_egress_addresses,
    resolve_paths,
    select_flows_through,
)
from controlplane.core.flowselect import Selector, select_flows
from controlplane.errors import EnvironmentProblem
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from controlplane.kernel.rtnl.topology import snapshot

__all__ = [
    "SelectedTeardown",
    "TeardownReport",
    "teardown_exact",
    "teardown_flows_via",
    "teardown_selected",
]


@dataclass(frozen=True)
class TeardownReport:
    """What a teardown did.

    ``examined``: entries dumped (only offloaded ones if asked); ``matched``:
    entries whose path uses a requested device; ``deleted`` + ``already_gone``
    = ``matched`` (already gone: expired or recreated since the dump).
    ``per_device``: matched entries per requested device (an entry through
    two requested devices counts for both). ``ambiguous``: matched entries
    whose path was over-approximated (missing neighbour or FDB entry).
    ``unknown_devices``: requested names absent from the namespace; the kernel
    flushes a device's flows itself when it unregisters.
    """

    examined: int
    matched: int
    deleted: int
    recreated: int
    already_gone: int
    elapsed: float
    per_device: dict[str, int] = field(default_factory=dict)
    ambiguous: int = 0
    unknown_devices: frozenset[str] = frozenset()
    timings: dict[str, float] = field(default_factory=dict)


def teardown_flows_via(
    devices: set[str],
    netns: str | None = None,
    only_offloaded: bool = True,
    reinject: bool = True,
) -> TeardownReport:
    """Take the flows whose path goes through any of ``devices`` off the fast path.

    Their conntrack entries are deleted (which tears the offloaded flow down)
    and, with ``reinject``, re-created at once without the OFFLOAD bit, with
    the same tuples, zone, mark and NAT mapping, so that NATed connections
    continue on the classic path (and are re-offloaded if still eligible).
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        return now

    with ConntrackSocket(netns) as ct:
        flows = ct.dump(only_offloaded=only_offloaded)
        t = lap("dump", start)
        addresses = {addr for flow in flows for addr in flow_egress_addresses(flow)}
        topology = snapshot(addresses, netns)
        t = lap("topology", t)
        by_name = {link.name: link.ifindex for link in topology.links.values()}
        wanted = {name: by_name[name] for name in devices if name in by_name}
        paths = resolve_paths(topology, flows)
        selected = select_flows_through(flows, paths, wanted.values())
        t = lap("resolve", t)
        result = ct.delete(selected)
        t = lap("delete", t)
        recreated = 0
        if reinject:
            # flowtables only carry TCP and UDP; other entries just go
            # core/reinject decides: TCP and UDP (flowtables carry nothing else),
            # with the namespace's conntrack timeouts
            recreated, _ = ct.reinject(ct.last_deleted)
            lap("reinject", t)

    per_device: Counter[str] = Counter({name: 0 for name in wanted})
    for flow in selected:
        used = paths[flow].devices
        per_device.update(name for name, ifindex in wanted.items() if ifindex in used)
    return TeardownReport(
        examined=len(flows),
        matched=len(selected),
        deleted=result.deleted,
        recreated=recreated,
        already_gone=result.already_gone,
        elapsed=time.perf_counter() - start,
        per_device=dict(per_device),
        ambiguous=sum(1 for flow in selected if paths[flow].ambiguous),
        unknown_devices=frozenset(devices - wanted.keys()),
        timings=timings,
    )


@dataclass(frozen=True)
class SelectedTeardown:
    """What ``offloadctl flows teardown`` did: ``matched`` flows are what
    ``offloadctl flows`` lists for the same selector; ``selected`` are the
    offloaded ones among them (with the devices of their path, by name), the
    only ones torn down; then the kernel's answers."""

    selector: Selector
    examined: int
    matched: int
    selected: tuple[tuple[Flow, tuple[str, ...]], ...]
    deleted: int
    recreated: int
    already_gone: int
    dry_run: bool
    elapsed: float


def teardown_selected(
    selector: Selector,
    netns: str | None = None,
    *,
    only_offloaded: bool = True,
    reinject: bool = True,
    dry_run: bool = False,
) -> SelectedTeardown:
    """Tear down exactly the flows ``selector`` picks (see ``core/flowselect``).

    A ``dev`` naming no device of the namespace raises EnvironmentProblem
    before anything is touched.
    """
    start = time.perf_counter()
    with ConntrackSocket(netns) as ct:
        # Every entry, not only offloaded ones: the selection is the one
        # ``offloadctl flows`` shows for the same selector (core/flowselect).
        flows = ct.dump()
        addresses = {addr for flow in flows for addr in flow_egress_addresses(flow)}
        topology = snapshot(addresses, netns)
        if selector.kind == "dev" and topology.ifindex(selector.value) is None:
            where = f" in network namespace {netns!r}" if netns else ""
            raise EnvironmentProblem(f"--dev: no device {selector.value!r}{where}")
        matched = select_flows(flows, topology, selector)
        picked = [(f, e) for f, e in matched if f.offloaded or not only_offloaded]
        named = tuple(
            (
                flow,
                tuple(topology.name(i) for i in dict.fromkeys(orig.devices + reply.devices)),
            )
            for flow, (orig, reply) in picked
        )
        deleted = recreated = gone = 0
        if not dry_run and picked:
            result = ct.delete(flow for flow, _ in picked)
            deleted, gone = result.deleted, result.already_gone
            if reinject:
                recreated, _ = ct.reinject(ct.last_deleted)
    return SelectedTeardown(
        selector=selector,
        examined=len(flows),
        matched=len(matched),
        selected=named,
        deleted=deleted,
        recreated=recreated,
        already_gone=gone,
        dry_run=dry_run,
        elapsed=time.perf_counter() - start,
    )


def teardown_exact(
    ct: ConntrackSocket, flows: Iterable[Flow], *, reinject: bool = True
) -> tuple[int, int, int]:
    """Delete exactly these entries (tuple + zone + id) and re-create them as
    ``core/reinject`` decides; (deleted, already gone, re-created)."""
    result = ct.delete(flows)
    recreated = ct.reinject(ct.last_deleted)[0] if reinject and ct.last_deleted else 0
    return result.deleted, result.already_gone, recreated
