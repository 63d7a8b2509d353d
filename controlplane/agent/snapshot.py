"""What the agent knows about itself, as one immutable value.

The loop thread builds a new :class:`Snapshot` after every decision and after
each periodic kernel refresh, and publishes it by swapping one reference.
Readers in other threads (the metrics exporter) only ever see a complete
snapshot and never touch the kernel, a socket or a namespace themselves.
The control protocol's ``status`` answer is :meth:`Snapshot.to_json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane.service.kernel_view import KernelView

__all__ = ["KernelView", "Outcome", "Snapshot"]


@dataclass(frozen=True)
class Outcome:
    """The result of one apply or reload."""

    at: float  # wall clock (time.time())
    ok: bool
    source: str  # "start", "sighup", "control", "file"
    changed: bool = False
    summary: tuple[str, ...] = ()
    seconds: float = 0.0
    error: str | None = None
    issues: tuple[dict[str, Any], ...] = ()
    exit_code: int = 0  # the CLI's exit code for this error (controlplane.errors)


@dataclass(frozen=True)
class Snapshot:
    version: str
    pid: int
    netns: str | None
    config_path: str
    config_sha256: str
    started_at: float
    table: str
    last_apply: Outcome | None = None
    last_reload: Outcome | None = None
    applies: dict[str, int] = field(default_factory=dict)  # result -> count
    reloads: dict[str, int] = field(default_factory=dict)  # result -> count
    kernel: KernelView = field(default_factory=KernelView)
    reuseport: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> facts
    # Filled by subsystems (the watcher / invalidation engine): events, overflows,
    # resyncs, invalidations by cause. TODO(integration): H4b's watch loop stats.
    invalidation: dict[str, Any] = field(default_factory=dict)
    control: dict[str, int] = field(default_factory=dict)
    # Drift checks (another writer changed our table): the period, repairs so far.
    drift_check_seconds: float = 0.0
    drift_repairs: int = 0
    flowtable_names: tuple[str, ...] = ()  # of the running config (metrics start at 0)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["kernel"]["flowtables"] = {k: list(v) for k, v in self.kernel.flowtables.items()}
        return doc
