"""``offloadctl status``: what the kernel has right now, in one dictionary."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from controlplane.core import nft, ownership
from controlplane.core.devices import classic_path_report
from controlplane.core.explain import status_line
from controlplane.core.flowpath import IPS_HW_OFFLOAD, Topology
from controlplane.core.flowselect import select_flows
from controlplane.core.flowtally import FlowTally
from controlplane.core.plan import Plan
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from controlplane.kernel.flowstate import named_counters
from controlplane.kernel.netns import require_root
from controlplane.kernel.nft.libnft import Nft
from controlplane.kernel.rtnl.facts import half_offloaded_flows
from controlplane.kernel.rtnl.topology import local_routes


def collect(
    table: nft.TableRef | str,
    netns: str | None = None,
    plan: Plan | None = None,
    family: str = "inet",
    capability: tuple[bool, str] | None = None,
) -> dict[str, Any]:
    """``table``: a TableRef (or a name that passed ObjName: the agent's config);
    ``plan``: the config's plan against this table, to report drift;
    ``capability``: the kernel's answer to "can you offload" if already known."""
    ref = table if isinstance(table, nft.TableRef) else nft.TableRef(family, table)
    require_root("reading kernel state")
    ctx = Nft(netns)
    can, why = capability or ctx.flowtables_supported()
    observed = ctx.list_table(ref)
    # Counted as the dump streams, never kept (core/flowtally.py: 100,000 entries
    # were +75 MB of Flow objects per view); the answers below read the samples.
    tally = FlowTally()
    with ConntrackSocket(netns) as ct:
        ct.dump_each(tally.add)
    flows = tally.samples()
    # Forwarded = what ``offloadctl flows`` lists (core/flowselect): not to or from
    # us. Which addresses are ours is all it needs: one dump of the local table,
    # not a route lookup per address (3x a conntrack dump at 20k flows).
    own = local_routes(tally.addresses(), netns)
    forwarded = [f for f, _ in select_flows(flows, Topology(routes=own), None)]
    decided = ownership.decide(observed)
    info: dict[str, Any] = {
        "kernel": {"can_offload": can, "reason": why},
        "table": observed is not None,
        "ownership": decided.ownership.value,
        "flowtables": [],
        "counters": {},
        "conntrack": tally.total,
        "offloaded": tally.weight(f for f in flows if f.offloaded),
        "forwarded_flows": tally.weight(forwarded),
        "forwarded_offloaded": tally.weight(f for f in forwarded if f.offloaded),
        "hw_offloaded": tally.weight(f for f in forwarded if f.status & IPS_HW_OFFLOAD),
        "drift": [],
    }
    if observed is None:
        if plan is not None:
            info["drift"] = [f"pending: {line.strip()}" for line in plan.summary]
        info["verdict"] = status_line(info)
        return info
    info["flowtables"] = [
        {
            "name": ft.name,
            "priority": ft.priority,
            "devices": sorted(ft.devices),
            "hw_offload": ft.hw_offload,
            "counter": ft.counter,
        }
        for ft in observed.flowtables.values()
    ]
    # Named counter values from the stateful listing for people.
    info["counters"] = named_counters(ctx.show(ref) or "")
    # Issue 9 (H3): per forward-hook input, packets of offloaded flows that still
    # took the classic path. [OFFLOAD] is per flow: a suspect input means the
    # direction entering there is not offloaded, so its flows are not counted.
    report = classic_path_report(
        {name: (c["packets"], c["bytes"]) for name, c in info["counters"].items()}
    )
    info["classic_path_by_input"] = [asdict(r) for r in report]
    half = half_offloaded_flows(flows, [r.ingress for r in report if r.suspect], netns)
    halves = tally.weight(half)
    info["offloaded"] -= halves
    info["forwarded_offloaded"] -= halves
    info["offloaded_one_direction"] = halves
    drift = [
        f"rule handle {r.handle} in chain {r.chain} is not ours" for r in observed.untagged_rules
    ]
    drift += [f"{o.kind.value} {o.name} added by hand" for o in observed.objects]
    if plan is not None:
        drift = list(plan.drift) + [f"pending: {line.strip()}" for line in plan.summary]
    info["drift"] = drift
    info["verdict"] = status_line(info)
    return info
