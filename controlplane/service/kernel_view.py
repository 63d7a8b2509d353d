"""What the kernel holds for a running config, as the agent reports it.

:class:`KernelObserver` takes the periodic view (``kernel/status.collect``: the
table, a conntrack dump, the verdict's counts; on a helper thread with its own
handles) and the cheap table part a ``status`` request refreshes on the loop
thread; the forwarded-path tally (``core/accounting``) is stepped with each
periodic view. Heavy imports happen on first use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controlplane.config import Config
from controlplane.core.accounting import PathTally
from controlplane.core.support import SupportMemo

if TYPE_CHECKING:
    from controlplane.core.flowselect import Selector
    from controlplane.kernel.nft.libnft import Nft

__all__ = ["KernelObserver", "KernelView"]


@dataclass(frozen=True)
class KernelView:
    """Refreshed periodically from the kernel (off the loop thread); the table
    part (``table_*``, flowtables, counters) also on every ``status`` request."""

    at: float = 0.0  # the whole view, conntrack counts included
    table_at: float = 0.0  # the table part alone
    table_present: bool = False
    flowtables: dict[str, tuple[str, ...]] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    conntrack: int = 0
    offloaded: int = 0
    # Kernel truth for the verdict line (kernel/status.py): can it offload, and
    # how many forwarded flows conntrack marks [OFFLOAD] (both directions hooked).
    kernel: dict[str, Any] = field(default_factory=dict)  # {"can_offload", "reason"}
    forwarded_flows: int = 0
    forwarded_offloaded: int = 0
    hw_offloaded: int = 0
    # group -> {"target_generation", "generations": [...], "counters": {...}}
    reuseport: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    # Forwarded packets/bytes by path ("fast", "classic"): monotonic totals
    # (core/accounting.py), taken with the conntrack counts.
    forwarded: dict[str, dict[str, int]] = field(default_factory=dict)


class KernelObserver:
    def __init__(self) -> None:
        self._nft: Nft | None = None  # the loop thread's own context (bound to netns)
        self._capable = SupportMemo()
        # Forwarded totals by path; stepped only by observe() (one helper thread).
        self._paths = PathTally()

    def _count_paths(self, cfg: Config, netns: str | None, counters: dict[str, Any]) -> None:
        """Step the fast/classic tally with this view's readings (core/accounting.py)."""
        from controlplane.core.devices import CLASSIC_IN_PREFIX
        from controlplane.core.render import CLASSIC_COUNTER

        entries = None
        if any(ft.counter for ft in cfg.flowtables):  # else conntrack holds no fast-path counts
            from controlplane.kernel.ctnetlink.accounting import entry_counters

            entries = entry_counters(netns)
        classic = counters.get(CLASSIC_COUNTER)
        inputs = [c for n, c in counters.items() if n.startswith(CLASSIC_IN_PREFIX)]
        self._paths.step(
            entries,
            (classic["packets"], classic["bytes"]) if classic else None,
            (sum(c["packets"] for c in inputs), sum(c["bytes"] for c in inputs))
            if inputs
            else None,
        )

    def observe(self, cfg: Config, netns: str | None) -> KernelView:
        from controlplane.kernel import status
        from controlplane.service.reuseport import group_status

        info = status.collect(
            cfg.table.name, netns, family=cfg.table.family, capability=self._capable.known
        )
        self._capable.learn((bool(info["kernel"]["can_offload"]), str(info["kernel"]["reason"])))
        groups = group_status(cfg.reuseport, netns)
        self._count_paths(cfg, netns, info["counters"])
        now = time.time()
        return KernelView(
            at=now,
            table_at=now,
            table_present=bool(info["table"]),
            flowtables={ft["name"]: tuple(ft["devices"]) for ft in info["flowtables"]},
            counters=dict(info["counters"]),
            conntrack=int(info["conntrack"]),
            offloaded=int(info["offloaded"]),
            kernel=dict(info["kernel"]),
            forwarded_flows=int(info["forwarded_flows"]),
            forwarded_offloaded=int(info["forwarded_offloaded"]),
            hw_offloaded=int(info["hw_offloaded"]),
            reuseport=groups,
            forwarded=self._paths.totals(),
        )

    def observe_table(self, cfg: Config, netns: str | None) -> KernelView:
        """The cheap part (table, flowtable devices, named counters, reuseport
        groups): two nft list calls and BPF map reads, no conntrack dump, so the
        loop thread can afford it on every status request."""
        from controlplane.core import nft
        from controlplane.kernel.flowstate import named_counters
        from controlplane.kernel.nft.libnft import Nft
        from controlplane.service.reuseport import group_status

        if self._nft is None:
            self._nft = Nft(netns)
        ref = nft.TableRef(cfg.table.family, cfg.table.name)
        observed = self._nft.list_table(ref)
        now = time.time()
        groups = group_status(cfg.reuseport, netns)
        if observed is None:
            return KernelView(table_at=now, reuseport=groups)
        return KernelView(
            table_at=now,
            reuseport=groups,
            table_present=True,
            flowtables={n: tuple(sorted(f.devices)) for n, f in observed.flowtables.items()},
            counters=named_counters(self._nft.show(ref) or "") if observed.counters else {},
        )

    def flows(
        self, cfg: Config, netns: str | None, limit: int, selector: Selector | None, offloaded: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        """``offloadctl flows``' answer, read from the kernel exactly as the CLI
        reads it without an agent (kernel/flowstate.py). The invalidation index
        is not consulted: it holds every TCP/UDP entry as *possibly* offloaded."""
        from controlplane.kernel.flowstate import read_flow_docs

        return read_flow_docs(netns, cfg.table.name, selector, offloaded, limit)
