"""Plan / apply / flush orchestration over injected kernel ports."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controlplane.service.ruleset import (
        ApplyResult,
        Ports,
        RulesetService,
        apply,
        flush,
        plan,
        real_ports,
    )

__all__ = ["ApplyResult", "Ports", "RulesetService", "apply", "flush", "plan", "real_ports"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `offloadctl watch` imports controlplane.service.invalidation,
    # which must not pay for the ruleset planner it never uses (~0.8 MB RSS).
    if name in __all__:
        from controlplane.service import ruleset

        return getattr(ruleset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
