"""Conntrack counted without keeping it: ``offloadctl status`` and the agent's kernel view.

Every answer of ``status`` about flows (forwarded or to us, offloaded, hardware-offloaded,
offloaded in one direction only) depends on a flow's two egress addresses
(``flowpath.flow_egress_addresses``) and its offload bits, nothing else. So a dump is
folded, entry by entry, into one sample flow and a count per distinct (addresses, bits):
a table of 100,000 entries between 1,000 hosts and a server is ~1,000 samples, not
100,000 ``Flow`` objects. Those objects were the agent's RSS peak (+75 MB at 100,000
entries, every kernel view: docs/agent.md, *Design notes*); under TCG a view's dump outlasts its
10 s period, so they never left the VM's RSS.
"""

from __future__ import annotations

from collections.abc import Iterable

from controlplane.core.flowpath import IPS_HW_OFFLOAD, IPS_OFFLOAD, Flow, flow_egress_addresses

__all__ = ["FlowTally"]

_BITS = IPS_OFFLOAD | IPS_HW_OFFLOAD


class FlowTally:
    """Samples and counts; feed it with :meth:`add` (a dump callback)."""

    def __init__(self) -> None:
        self.total = 0
        self._count: dict[tuple[str, str, int], int] = {}
        self._sample: dict[tuple[str, str, int], Flow] = {}

    def add(self, flow: Flow) -> None:
        self.total += 1
        key = (*flow_egress_addresses(flow), flow.status & _BITS)
        count = self._count.get(key)
        if count is None:
            self._sample[key] = flow
            self._count[key] = 1
        else:
            self._count[key] = count + 1

    def samples(self) -> list[Flow]:
        """One flow per distinct (egress addresses, offload bits)."""
        return list(self._sample.values())

    def weight(self, flows: Iterable[Flow]) -> int:
        """How many entries the samples ``flows`` (a selection of :meth:`samples`) stand for."""
        count = self._count
        return sum(count[(*flow_egress_addresses(f), f.status & _BITS)] for f in flows)

    def addresses(self) -> set[str]:
        return {a for a, b, _ in self._count for a in (a, b)}
