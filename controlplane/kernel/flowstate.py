"""Forwarded flows as the kernel holds them: what ``flows``, ``status`` and
``explain`` read (with or without an agent: the agent calls the same code).

One conntrack dump (with TCP state and packet counters), one topology snapshot
for the flows' addresses, the owned table's flowtables and ``classic_in_*``
counters; the selection is ``core/flowselect.select_flows``, the one
``flows teardown`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane.core import nft
from controlplane.core.devices import classic_counter_of
from controlplane.core.explain import CtInfo, TableFacts
from controlplane.core.flowdoc import flow_json
from controlplane.core.flowpath import IPS_HW_OFFLOAD, Egress, Flow, Topology, flow_egress_addresses
from controlplane.core.flowselect import Selector, select_flows
from controlplane.errors import EnvironmentProblem
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket
from controlplane.kernel.nft.libnft import Nft
from controlplane.kernel.rtnl.topology import snapshot

__all__ = [
    "Forwarded",
    "flow_doc",
    "named_counters",
    "read_flow_docs",
    "read_forwarded",
    "table_facts",
]


def named_counters(text: str) -> dict[str, dict[str, int]]:
    """Named counters' values from ``nft list table`` text (the parsed listing
    keeps names only)."""
    out: dict[str, dict[str, int]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines[:-1]):
        head = line.strip()
        if head.startswith("counter ") and head.endswith("{"):
            value = lines[i + 1].split()
            if len(value) >= 4 and value[0] == "packets":
                out[head.split()[1]] = {"packets": int(value[1]), "bytes": int(value[3])}
    return out


def table_facts(ctx: Nft, ref: nft.TableRef) -> TableFacts:
    observed = ctx.list_table(ref)
    if observed is None:
        return TableFacts()
    counters = named_counters(ctx.show(ref) or "") if observed.counters else {}
    return TableFacts(
        True,
        {n: frozenset(f.devices) for n, f in observed.flowtables.items()},
        {name: c["packets"] for name, c in counters.items()},
    )


@dataclass(frozen=True)
class Forwarded:
    """The selected forwarded flows (conntrack order) with their egress per
    direction; ``examined``: every entry dumped."""

    flows: list[tuple[Flow, CtInfo, tuple[Egress, Egress]]]
    topology: Topology
    table: TableFacts
    examined: int


def read_forwarded(
    netns: str | None,
    ref: nft.TableRef,
    selector: Selector | None = None,
    *,
    only_offloaded: bool = False,
    ctx: Nft | None = None,
) -> Forwarded:
    """The forwarded flows ``selector`` picks (None: all), as the kernel has them.

    A ``--dev`` naming no device of the namespace raises EnvironmentProblem.
    """
    with ConntrackSocket(netns) as ct:
        entries = ct.dump_info(only_offloaded=only_offloaded)
    topology = snapshot({a for f, _ in entries for a in flow_egress_addresses(f)}, netns)
    if selector is not None and selector.kind == "dev" and topology.ifindex(selector.value) is None:
        where = f" in network namespace {netns!r}" if netns else ""
        raise EnvironmentProblem(f"--dev: no device {selector.value!r}{where}")
    info = dict(entries)
    picked = select_flows([f for f, _ in entries], topology, selector)
    table = table_facts(ctx or Nft(netns), ref)
    return Forwarded([(f, info[f], e) for f, e in picked], topology, table, len(entries))


def flow_doc(
    flow: Flow, ct: CtInfo, paths: tuple[Egress, Egress], topology: Topology, table: TableFacts
) -> dict[str, Any]:
    """One flow as ``offloadctl flows --json`` prints it (and the agent answers).

    ``offloaded``/``hw_offloaded``: the kernel's IPS_OFFLOAD / IPS_HW_OFFLOAD
    bits. ``classic_in``: per direction, the device it enters through (as the
    forward hook names it) and the packets of offloaded flows the ruleset
    counted there on the classic path (a per-device counter, not per flow;
    absent when the table counts nothing)."""
    out, back = paths
    doc = flow_json(flow, out, back, topology.name) | {
        "hw_offloaded": bool(flow.status & IPS_HW_OFFLOAD),
        "status": flow.status,
        "tcp_state": ct.tcp_state,
        "packets": list(ct.packets) if ct.packets is not None else None,
    }
    if table.counters:
        doc["classic_in"] = {}
        for direction, entering in (("orig", back), ("reply", out)):
            if entering.devices:
                l3 = topology.name(entering.devices[0])
                counter = classic_counter_of(l3, table.counters)
                doc["classic_in"][direction] = {
                    "ingress": l3,
                    "packets": table.counters.get(counter, 0),
                }
    return doc


def read_flow_docs(
    netns: str | None,
    table: str,
    selector: Selector | None,
    offloaded: bool,
    limit: int | None,
    ctx: Nft | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """``offloadctl flows``' answer (the CLI's and the agent's): the docs of the
    selected forwarded flows, at most ``limit``, and whether more were left out."""
    found = read_forwarded(
        netns, nft.TableRef("inet", table), selector, only_offloaded=offloaded, ctx=ctx
    )
    picked = found.flows if limit is None else found.flows[:limit]
    docs = [flow_doc(f, ct, e, found.topology, found.table) for f, ct, e in picked]
    return docs, len(picked) < len(found.flows)
