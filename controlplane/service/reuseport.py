"""The agent's reuseport groups: load what the config declares, unload what we
own and no longer declare, and read each group's status.

Which group is loaded, unloaded, forgotten or kept is
:func:`controlplane.core.reuseport_groups.plan_groups`'s decision; this module
asks the kernel what it holds, runs the decision through a :class:`GroupsPort`
(``kernel/bpf/groups.BpfGroups``; a fake in unit tests) and reports. A failure
to remove a group we own is reported and the group stays ours: only a group the
kernel provably no longer holds is forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from controlplane.config import ReuseportConfig, ReuseportGroup
from controlplane.core.reuseport_groups import owned_after, plan_groups
from controlplane.errors import EnvironmentProblem, KernelError, one_line

__all__ = ["GroupsOutcome", "GroupsPort", "OwnedGroups", "ReuseportGroups", "group_status"]

# What a group's removal may fail with that is not our bug: the environment
# (bpffs, permissions, a half-loaded group) or the kernel refusing.
_REMOVAL_FAILURES = (EnvironmentProblem, KernelError)


class Loaded(Protocol):
    @property
    def pin_dir(self) -> str: ...
    @property
    def prog_id(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def already_loaded(self) -> bool: ...


class Unloaded(Protocol):
    @property
    def live_listeners(self) -> int: ...


class GroupsPort(Protocol):
    """Reuseport groups of one network namespace."""

    def load(self, group: ReuseportGroup, bpffs: str) -> Loaded:
        """Load ``group`` (an already loaded one is checked and kept)."""
        ...

    def unload(self, name: str, bpffs: str) -> Unloaded:
        """Remove the pins of ``name``; EnvironmentProblem if it is not loaded."""
        ...

    def held(self, names: Iterable[str], bpffs: str) -> frozenset[str]:
        """Which of ``names`` the kernel holds; EnvironmentProblem when that cannot
        be read (no bpffs at ``bpffs``, permission denied)."""
        ...


class OwnedGroups(Protocol):
    """What an earlier run recorded as ours (``agent.state.AppliedState``)."""

    @property
    def reuseport_groups(self) -> tuple[str, ...]: ...
    @property
    def reuseport_bpffs(self) -> str: ...


@dataclass(frozen=True)
class GroupsOutcome:
    facts: dict[str, dict[str, Any]]  # declared group -> pin_dir, prog_id, capacity
    owned: tuple[str, ...]  # what the state records as ours now
    summary: tuple[str, ...] = ()  # what changed, one line each
    problems: tuple[str, ...] = ()  # groups we own that could not be removed, and why


class ReuseportGroups:
    def __init__(self, port: GroupsPort) -> None:
        self._port = port

    def _held(self, names: list[str], bpffs: str) -> tuple[frozenset[str] | None, str]:
        if not names:
            return frozenset(), ""
        try:
            return self._port.held(names, bpffs), ""
        except EnvironmentProblem as exc:
            return None, one_line(exc)

    def reconcile(self, cfg: ReuseportConfig, owned: OwnedGroups | None) -> GroupsOutcome:
        """Load the declared groups, remove the ones we own that are no longer
        declared. A failed load raises (nothing of it is recorded as ours)."""
        was = owned.reuseport_groups if owned else ()
        declared = [g.name for g in cfg.groups]
        if not declared and not was:
            return GroupsOutcome({}, ())
        old_bpffs = owned.reuseport_bpffs if owned else cfg.bpffs
        stale = sorted(set(was) - set(declared))
        held, why = self._held(stale, old_bpffs)
        changes = plan_groups(declared, was, held)
        summary: list[str] = []
        facts: dict[str, dict[str, Any]] = {}
        by_name = {g.name: g for g in cfg.groups}
        for name in changes.load:
            group = by_name[name]
            res = self._port.load(group, cfg.bpffs)
            if not res.already_loaded:
                summary.append(f"+ reuseport group {group.name} (prog id {res.prog_id})")
            facts[group.name] = {
                "pin_dir": res.pin_dir,
                "prog_id": res.prog_id,
                "capacity": res.capacity,
            }
        problems = [f"reuseport group {g} kept as ours: {why}" for g in changes.unknown]
        failed: list[str] = []
        for name in changes.unload:
            try:
                self._port.unload(name, old_bpffs)
            except _REMOVAL_FAILURES as exc:
                failed.append(name)
                problems.append(
                    f"reuseport group {name} not removed, kept as ours: {one_line(exc)}"
                )
                continue
            summary.append(f"- reuseport group {name}")
        return GroupsOutcome(facts, owned_after(changes, failed), tuple(summary), tuple(problems))

    def remove_all(
        self, cfg: ReuseportConfig, owned: OwnedGroups | None
    ) -> tuple[list[str], list[str]]:
        """Unload every group we own or declare (cleanup on exit): what was done,
        and what could not be (those stay pinned and are named)."""
        done: list[str] = []
        problems: list[str] = []
        places: dict[str, list[str]] = {}
        for name in owned.reuseport_groups if owned else ():
            places.setdefault(owned.reuseport_bpffs if owned else cfg.bpffs, []).append(name)
        for group in cfg.groups:
            places.setdefault(cfg.bpffs, []).append(group.name)
        for bpffs, names in sorted(places.items()):
            names = sorted(set(names))
            held, why = self._held(names, bpffs)
            changes = plan_groups((), names, held)
            problems += [f"reuseport group {g} left in place: {why}" for g in changes.unknown]
            for name in changes.unload:
                try:
                    res = self._port.unload(name, bpffs)
                except _REMOVAL_FAILURES as exc:
                    problems.append(f"reuseport group {name} left in place: {one_line(exc)}")
                    continue
                done.append(
                    f"unloaded reuseport group {name} ({res.live_listeners} live listeners)"
                )
        return done, problems


def group_status(cfg: ReuseportConfig, netns: str | None) -> dict[str, dict[str, Any]]:
    """Each configured group's generations and program counters (BPF map reads)."""
    groups: dict[str, dict[str, Any]] = {}
    if not cfg.groups:
        return groups
    from controlplane.reuseport import ReuseportGroup as Group

    for g in cfg.groups:
        try:
            with Group.open(g.name, netns, cfg.bpffs) as group:
                st = group.status()
        except EnvironmentProblem as exc:
            groups[g.name] = {"error": str(exc)}
            continue
        groups[g.name] = {
            "prog_id": st.prog_id,
            "target_generation": st.target_generation,
            "generations": [
                {
                    "generation": gen.generation,
                    "active": gen.active,
                    "target": gen.target,
                    "listeners": len(gen.slots),
                }
                for gen in st.generations
            ],
            "counters": asdict(st.counters),
        }
    return groups
