"""Facts for ``offloadctl explain`` (``core/explain.py`` reasons over them).

Reads only: the kernel's capability (a checked, never committed, flowtable),
every conntrack entry with its TCP state and counters, a topology snapshot
routed for the entries' addresses, and the owned table's flowtables and
``classic_in_*`` counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controlplane.config import OffloadPolicy
from controlplane.core import nft
from controlplane.core.explain import CtInfo, World
from controlplane.core.flowpath import Flow, flow_egress_addresses
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from controlplane.kernel.flowstate import table_facts
from controlplane.kernel.nft.libnft import Nft
from controlplane.kernel.rtnl.topology import snapshot

__all__ = ["Gathered", "gather"]


@dataclass(frozen=True)
class Gathered:
    world: World
    entries: list[tuple[Flow, CtInfo]]


def gather(
    netns: str | None, ref: nft.TableRef, policies: Sequence[OffloadPolicy] | None
) -> Gathered:
    ctx = Nft(netns)
    capability = ctx.flowtables_supported()
    with ConntrackSocket(netns) as ct:
        entries = ct.dump_info()
    topology = snapshot({a for f, _ in entries for a in flow_egress_addresses(f)}, netns)
    world = World(
        capability,
        table_facts(ctx, ref),
        topology,
        tuple(policies) if policies is not None else None,
    )
    return Gathered(world, entries)
