"""The seams between the agent's loop and the kernel, as small Protocols.

The loop only ever calls these; :mod:`controlplane.agent.kernel_backend` holds
the real implementations and unit tests inject fakes (tests/unit/test_agent_*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from controlplane.agent.snapshot import KernelView
from controlplane.agent.state import AppliedState
from controlplane.config import Config


@dataclass(frozen=True)
class ApplyOutcome:
    changed: bool
    summary: tuple[str, ...] = ()
    seconds: float = 0.0
    # reuseport group -> facts (prog id, pin dir, already loaded...)
    reuseport: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Milliseconds per apply phase (lock, prepare, list+plan or plan, commit...):
    # logged with a topology commit so a join's latency can be broken down.
    phases: dict[str, float] = field(default_factory=dict)
    flows_torn_down: int = 0  # offloaded flows of devices that left a flowtable


class Applier(Protocol):
    def apply(self, cfg: Config, netns: str | None, owned: AppliedState | None) -> ApplyOutcome:
        """Make the kernel match ``cfg`` in one transaction; raise a ControlPlaneError
        (ConfigError / EnvironmentProblem / UnsupportedError / KernelError) with the
        previous kernel state kept. ``owned`` is what an earlier run applied."""
        ...

    def cleanup(self, cfg: Config, netns: str | None, owned: AppliedState | None) -> list[str]:
        """Remove what we own (the table, our reuseport groups); one line per action."""
        ...


class Observer(Protocol):
    def observe(self, cfg: Config, netns: str | None) -> KernelView: ...

    def flows(
        self, cfg: Config, netns: str | None, limit: int, selector: Any, offloaded: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` forwarded flows (``selector``: a ``core.flowselect.Selector``
        or None) as ``offloadctl flows --json`` prints them, and whether more exist."""
        ...


class Subsystem(Protocol):
    """Something else the loop drives: the watcher + invalidation engine
    (:class:`controlplane.agent.invalidation.InvalidationSubsystem`)."""

    name: str
    epoch: int  # bumped whenever fds() may have changed

    def fds(self) -> list[int]:
        """Descriptors to wait on (may change after :meth:`reconfigure`)."""
        ...

    def on_readable(self) -> None: ...

    def tick(self) -> None:
        """Periodic work (reconciliation); called about once a second."""
        ...

    def reconfigure(self, cfg: Config) -> None:
        """Follow a committed config (start, stop or re-create what it runs)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Merged into the status' ``invalidation``: events, overflows, resyncs, by_cause."""
        ...

    def close(self) -> None: ...
