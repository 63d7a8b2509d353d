"""Kept for callers of the old path: the orchestration lives in ``controlplane.service``."""

from controlplane.kernel.rtnl.facts import gather_facts
from controlplane.service.ruleset import ApplyResult, apply, flush, plan

__all__ = ["ApplyResult", "apply", "flush", "gather_facts", "plan"]
