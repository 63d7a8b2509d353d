"""Which reuseport groups an apply loads, unloads or forgets: pure.

Inputs are the groups the config declares, the groups an earlier run applied
and recorded as ours (the state file), and which of those the kernel still
holds (their pin directories exist on a mounted bpffs). A group we own that is
no longer declared is unloaded only if the kernel holds it, and forgotten only
if the kernel provably does not: a group whose presence could not be read, or
whose unload failed, stays ours (recorded, retried on the next apply), never
"already gone".
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

__all__ = ["GroupChanges", "owned_after", "plan_groups"]


@dataclass(frozen=True)
class GroupChanges:
    load: tuple[str, ...]  # declared: loaded (an already loaded one is checked and kept)
    unload: tuple[str, ...]  # ours, no longer declared, held by the kernel
    forget: tuple[str, ...]  # ours, no longer declared, and the kernel holds none of it
    unknown: tuple[str, ...]  # ours, no longer declared, presence unknown: kept as ours


def plan_groups(
    declared: Iterable[str], owned: Iterable[str], held: Collection[str] | None
) -> GroupChanges:
    """``held``: which of the undeclared owned groups the kernel holds (None: it
    could not be read)."""
    load = tuple(dict.fromkeys(declared))
    stale = sorted(set(owned) - set(load))
    if held is None:
        return GroupChanges(load, (), (), tuple(stale))
    return GroupChanges(
        load,
        tuple(g for g in stale if g in held),
        tuple(g for g in stale if g not in held),
        (),
    )


def owned_after(changes: GroupChanges, failed: Iterable[str]) -> tuple[str, ...]:
    """What the state records as ours once the changes ran: the declared groups,
    and every undeclared one not provably gone (unknown, or its unload failed)."""
    kept = set(changes.unknown) | (set(changes.unload) & set(failed))
    return tuple(sorted(set(changes.load) | kept))
