"""One flow as ``offloadctl flows --json`` prints it: the one place its keys are built.

Used by the kernel reader (``kernel/flowstate.flow_doc``: the CLI's and the agent's
answer, which adds conntrack's counters and the classic-path counters) and by the
agent's index view (``agent/invalidation.InvalidationSubsystem.flows``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from controlplane.core.flowpath import Egress, Flow

__all__ = ["flow_json"]


def flow_json(
    flow: Flow, orig: Egress | None, reply: Egress | None, name_of: Callable[[int], str]
) -> dict[str, Any]:
    """``flow``'s fields (``Flow.as_dict``), the devices each direction leaves through
    (``orig_devices``, ``reply_devices``; empty when not known) and ``ambiguous``: a
    direction's path is not fully known (an FDB or neighbour entry is missing)."""

    def devices(egress: Egress | None) -> list[str]:
        return [name_of(i) for i in egress.devices] if egress is not None else []

    return flow.as_dict() | {
        "orig_devices": devices(orig),
        "reply_devices": devices(reply),
        "ambiguous": any(e is not None and not e.complete for e in (orig, reply)),
    }
