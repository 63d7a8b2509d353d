"""Plan / apply / flush orchestration over injected kernel ports."""

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
