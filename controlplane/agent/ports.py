"""The seams between the agent's loop and what it drives, as small Protocols.

Every method the agent calls is declared here, so ``mypy --strict`` checks each
call: ``controlplane.service.applier.KernelApplier`` and
``controlplane.service.kernel_view.KernelObserver`` are the real Applier and
Observer, ``controlplane.agent.invalidation.InvalidationSubsystem`` the real
Subsystem; unit tests inject fakes (tests/unit/test_agent_*).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from controlplane.agent.state import AppliedState
from controlplane.config import Config
from controlplane.core.flowpath import Link
from controlplane.service.applier import ApplyOutcome
from controlplane.service.kernel_view import KernelView

if TYPE_CHECKING:
    from controlplane.core.flowselect import Selector

__all__ = ["Applier", "ApplyOutcome", "Observer", "Subsystem"]


class Applier(Protocol):
    def apply(self, cfg: Config, netns: str | None, owned: AppliedState | None) -> ApplyOutcome:
        """Make the kernel match ``cfg`` in one transaction; raise a ControlPlaneError
        (ConfigError / EnvironmentProblem / UnsupportedError / KernelError) with the
        previous kernel state kept. ``owned`` is what an earlier run applied."""
        ...

    def cleanup(self, cfg: Config, netns: str | None, owned: AppliedState | None) -> list[str]:
        """Remove what we own (the table, our reuseport groups); one line per action.
        Raises a ControlPlaneError naming what could not be removed."""
        ...

    def settle(self) -> None:
        """Idle-time work after a commit is logged (what lets the next join skip
        the listing)."""
        ...

    def plan_next_from(self, links: Mapping[int, Link]) -> None:
        """Take the next apply's facts from this link cache instead of the kernel."""
        ...


class Observer(Protocol):
    def observe(self, cfg: Config, netns: str | None) -> KernelView:
        """The whole view, conntrack counts included (off the loop thread)."""
        ...

    def observe_table(self, cfg: Config, netns: str | None) -> KernelView:
        """The table part only (no conntrack dump): cheap enough for the loop."""
        ...

    def flows(
        self, cfg: Config, netns: str | None, limit: int, selector: Selector | None, offloaded: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` forwarded flows as ``offloadctl flows --json`` prints
        them, and whether more exist."""
        ...


class Subsystem(Protocol):
    """Something else the loop drives: the watcher + invalidation engine
    (:class:`controlplane.agent.invalidation.InvalidationSubsystem`)."""

    name: str
    epoch: int  # bumped whenever fds() may have changed
    woke_at: float  # wall clock of the last read of its sockets (join latency)

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

    def links(self) -> Mapping[int, Link] | None:
        """Its link cache (ifindex -> Link) once filled; None when it has none."""
        ...

    def close(self) -> None: ...
