"""Generation bookkeeping for one SO_REUSEPORT group: pure, no kernel access.

A group is a fixed number of *slots* (the entries of its REUSEPORT_SOCKARRAY);
each occupied slot holds one listener of one *generation* (a positive integer
chosen by the service, higher is newer). A generation is *active* once the
service says its listeners are ready; *retiring* it forgets it and frees its
slots.

The BPF program only ever sees the :class:`Target`: the slots of the newest
active generation that still has listeners. New connections are spread over
those slots, and queued connections of a closing listener migrate to them.

Every operation here is a function from a :class:`GroupState` to a new one;
:func:`plan_writes` turns the difference into the map writes the adapter
(``controlplane.reuseport``) applies. The kernel empties a slot by itself when
its listener closes, so the adapter first reports which slots are still live
(:func:`reconcile`) and the state follows the kernel, never the reverse.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.errors import ConfigError, ConfigIssue, EnvironmentProblem

__all__ = [
    "MAX_GENERATION",
    "GroupState",
    "Reconciled",
    "Target",
    "Writes",
    "activate",
    "allocate",
    "check_generation",
    "check_group_name",
    "plan_writes",
    "reconcile",
    "retire",
    "target",
]

# Generations live in u32 map fields; 0 marks a free slot.
MAX_GENERATION = 2**32 - 1
_GROUP_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


def check_group_name(name: str) -> str:
    # The name becomes a bpffs directory: keep it to characters that need no
    # quoting anywhere (same rule as config object names).
    if not _GROUP_RE.fullmatch(name):
        raise ConfigError(
            [
                ConfigIssue(
                    "name",
                    f"invalid group name {name!r}: start with a letter, then up to 62 of"
                    " A-Z a-z 0-9 _ -",
                )
            ]
        )
    return name


def check_generation(generation: int) -> int:
    if isinstance(generation, bool) or not isinstance(generation, int):
        raise ConfigError([ConfigIssue("generation", f"expected an integer, got {generation!r}")])
    if not 1 <= generation <= MAX_GENERATION:
        raise ConfigError(
            [ConfigIssue("generation", f"{generation} is out of range 1..{MAX_GENERATION}")]
        )
    return generation


@dataclass(frozen=True)
class Target:
    """What the BPF program steers to: ``generation`` 0 means nothing."""

    generation: int = 0
    slots: tuple[int, ...] = ()
    drop_when_no_target: bool = False


@dataclass(frozen=True)
class GroupState:
    capacity: int
    slots: Mapping[int, int] = field(default_factory=dict)
    active: frozenset[int] = frozenset()
    drop_when_no_target: bool = False

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be positive")
        for slot, gen in self.slots.items():
            if not 0 <= slot < self.capacity:
                raise ValueError(f"slot {slot} outside capacity {self.capacity}")
            check_generation(gen)
        # Read-only view: a state is a value, transitions build new ones.
        object.__setattr__(self, "slots", MappingProxyType(dict(self.slots)))

    def slots_of(self, generation: int) -> tuple[int, ...]:
        return tuple(sorted(s for s, g in self.slots.items() if g == generation))

    def generations(self) -> list[int]:
        """Every generation with listeners or marked active, newest first."""
        return sorted(set(self.slots.values()) | self.active, reverse=True)

    def _with(
        self,
        *,
        slots: Mapping[int, int] | None = None,
        active: frozenset[int] | None = None,
    ) -> GroupState:
        return GroupState(
            capacity=self.capacity,
            slots=self.slots if slots is None else slots,
            active=self.active if active is None else active,
            drop_when_no_target=self.drop_when_no_target,
        )


@dataclass(frozen=True)
class Reconciled:
    state: GroupState
    stale: tuple[int, ...]  # bookkept slots whose listener closed
    orphans: tuple[int, ...]  # live sockarray slots nobody bookkept (evict them)


def reconcile(state: GroupState, live: Collection[int]) -> Reconciled:
    """Follow the kernel: ``live`` are the slots whose sockarray entry holds a socket."""
    live_set = set(live)
    stale = tuple(sorted(s for s in state.slots if s not in live_set))
    # A registration that died between the sockarray write and the bookkeeping
    # write leaves an orphan; it belongs to no generation, so it must go.
    orphans = tuple(sorted(s for s in live_set if s not in state.slots))
    kept = {s: g for s, g in state.slots.items() if s in live_set}
    return Reconciled(state._with(slots=kept), stale, orphans)


def allocate(state: GroupState, generation: int) -> tuple[GroupState, int]:
    """Give a new listener of ``generation`` the lowest free slot."""
    check_generation(generation)
    for slot in range(state.capacity):
        if slot not in state.slots:
            return state._with(slots={**state.slots, slot: generation}), slot
    raise EnvironmentProblem(
        f"reuseport group is full: all {state.capacity} listener slots are taken;"
        " retire an old generation or load the group with a larger --max-listeners"
    )


def activate(state: GroupState, generation: int) -> GroupState:
    check_generation(generation)
    if not state.slots_of(generation):
        raise ConfigError(
            [
                ConfigIssue(
                    "generation",
                    f"generation {generation} has no registered listeners; register"
                    " them before activating it",
                )
            ]
        )
    return state._with(active=state.active | {generation})


def retire(state: GroupState, generation: int) -> tuple[GroupState, tuple[int, ...]]:
    """Forget ``generation``: no longer a target, its slots freed. Idempotent."""
    check_generation(generation)
    freed = state.slots_of(generation)
    kept = {s: g for s, g in state.slots.items() if g != generation}
    return state._with(slots=kept, active=state.active - {generation}), freed


def target(state: GroupState) -> Target:
    """The newest active generation that still has listeners, and their slots.

    An active generation whose listeners all closed is skipped, so an older
    active one takes over instead of connections falling to the kernel.
    """
    for gen in sorted(state.active, reverse=True):
        slots = state.slots_of(gen)
        if slots:
            return Target(gen, slots, state.drop_when_no_target)
    return Target(0, (), state.drop_when_no_target)


@dataclass(frozen=True)
class Writes:
    """Map writes that take the kernel from one state to another, in order."""

    evict: tuple[int, ...] = ()  # sockarray entries to delete
    slot_gen: tuple[tuple[int, int], ...] = ()  # (slot, generation); 0 frees
    gen_active: tuple[tuple[int, bool], ...] = ()  # (generation, active?)
    target: Target | None = None  # None: the live table is already right

    def __bool__(self) -> bool:
        return bool(self.evict or self.slot_gen or self.gen_active or self.target)


def plan_writes(
    old: GroupState,
    new: GroupState,
    *,
    kernel_target: Target | None,
    evict: Collection[int] = (),
) -> Writes:
    """Diff ``old`` (as bookkept in the maps) against ``new``.

    ``kernel_target`` is the table the program reads now (None if unreadable):
    it is rewritten only when it differs, so a no-op costs no flip.
    """
    slot_gen = [(s, g) for s, g in sorted(new.slots.items()) if old.slots.get(s) != g]
    slot_gen += [(s, 0) for s in sorted(old.slots) if s not in new.slots]
    gen_active = [(g, True) for g in sorted(new.active - old.active)]
    gen_active += [(g, False) for g in sorted(old.active - new.active)]
    want = target(new)
    return Writes(
        evict=tuple(sorted(set(evict))),
        slot_gen=tuple(sorted(slot_gen)),
        gen_active=tuple(gen_active),
        target=None if want == kernel_target else want,
    )
