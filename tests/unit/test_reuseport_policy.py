"""The pure generation bookkeeping, checked against a naive model with hypothesis.

The model is written the obvious way (dicts, loops); the core must agree with
it after any sequence of registrations, activations, retirements and
listeners closing behind the control plane's back. A fake of the BPF maps
checks that ``plan_writes`` takes the kernel exactly to the new state.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core import reuseport_policy as rp
from controlplane.core.reuseport_policy import GroupState, Target
from controlplane.errors import ConfigError, EnvironmentProblem

# --- a fake of the maps the adapter writes ------------------------------------


@dataclass
class FakeMaps:
    slot_gen: dict[int, int] = field(default_factory=dict)
    gen_active: set[int] = field(default_factory=set)
    socks: set[int] = field(default_factory=set)  # live sockarray slots
    target: Target = field(default_factory=Target)
    flips: int = 0

    def read(self, capacity: int, drop: bool) -> tuple[GroupState, rp.Reconciled]:
        raw = GroupState(
            capacity=capacity,
            slots={s: g for s, g in self.slot_gen.items() if g},
            active=frozenset(self.gen_active),
            drop_when_no_target=drop,
        )
        return raw, rp.reconcile(raw, self.socks)

    def apply(self, w: rp.Writes) -> None:
        for s in w.evict:
            self.socks.discard(s)
        for s, g in w.slot_gen:
            self.slot_gen[s] = g
        for g, on in w.gen_active:
            (self.gen_active.add if on else self.gen_active.discard)(g)
        if w.target is not None:
            self.target = w.target
            self.flips += 1


# --- the naive model ----------------------------------------------------------


@dataclass
class Model:
    capacity: int
    slots: dict[int, int] = field(default_factory=dict)
    active: set[int] = field(default_factory=set)

    def target(self) -> tuple[int, tuple[int, ...]]:
        best = 0
        for g in self.active:
            if any(v == g for v in self.slots.values()) and g > best:
                best = g
        if not best:
            return 0, ()
        return best, tuple(sorted(s for s, v in self.slots.items() if v == best))


gens = st.integers(min_value=1, max_value=6)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("register"), gens),
        st.tuples(st.just("activate"), gens),
        st.tuples(st.just("retire"), gens),
        st.tuples(st.just("close"), st.integers(min_value=0, max_value=15)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(min_value=1, max_value=8), drop=st.booleans(), steps=ops)
def test_core_agrees_with_model_and_fake_kernel(
    capacity: int, drop: bool, steps: list[tuple[str, int]]
) -> None:
    model = Model(capacity)
    kernel = FakeMaps()
    for op, arg in steps:
        if op == "close":
            # A listener closes: the kernel empties its slot, nobody tells us.
            if kernel.socks:
                slot = sorted(kernel.socks)[arg % len(kernel.socks)]
                kernel.socks.discard(slot)
                model.slots.pop(slot, None)
            continue
        raw, rec = kernel.read(capacity, drop)
        assert rec.orphans == ()
        evict: tuple[int, ...] = rec.orphans
        if op == "register":
            if len(model.slots) == capacity:
                with pytest.raises(EnvironmentProblem, match="full"):
                    rp.allocate(rec.state, arg)
                continue
            new, slot = rp.allocate(rec.state, arg)
            assert slot == min(set(range(capacity)) - set(model.slots))
            assert slot not in kernel.socks
            kernel.socks.add(slot)  # the sockarray write precedes the bookkeeping
            model.slots[slot] = arg
        elif op == "activate":
            if arg not in model.slots.values():
                with pytest.raises(ConfigError, match="no registered listeners"):
                    rp.activate(rec.state, arg)
                continue
            new = rp.activate(rec.state, arg)
            model.active.add(arg)
        else:
            new, freed = rp.retire(rec.state, arg)
            assert set(freed) == {s for s, g in model.slots.items() if g == arg}
            evict += freed
            model.slots = {s: g for s, g in model.slots.items() if g != arg}
            model.active.discard(arg)

        writes = rp.plan_writes(raw, new, kernel_target=kernel.target, evict=evict)
        kernel.apply(writes)

        # The kernel now holds exactly the new state...
        _, after = kernel.read(capacity, drop)
        assert after.stale == () and after.orphans == ()
        assert dict(after.state.slots) == dict(new.slots) == model.slots
        assert after.state.active == new.active
        # ...and the program reads the model's target.
        gen, slots = model.target()
        assert kernel.target == Target(gen, slots, drop)
        assert rp.target(new) == kernel.target
        # Applying the same state again writes nothing.
        assert not rp.plan_writes(new, new, kernel_target=kernel.target)


@given(st.integers(min_value=1, max_value=rp.MAX_GENERATION))
def test_valid_generations_accepted(gen: int) -> None:
    assert rp.check_generation(gen) == gen


@pytest.mark.parametrize("bad", [0, -1, rp.MAX_GENERATION + 1, True, "3", 1.0])
def test_invalid_generations_rejected(bad: object) -> None:
    with pytest.raises(ConfigError, match="generation"):
        rp.check_generation(bad)  # type: ignore[arg-type]


def test_stale_and_orphan_slots() -> None:
    raw = GroupState(capacity=4, slots={0: 1, 1: 1, 2: 2}, active=frozenset({1, 2}))
    rec = rp.reconcile(raw, live={0, 2, 3})
    assert rec.stale == (1,)
    assert rec.orphans == (3,)
    assert dict(rec.state.slots) == {0: 1, 2: 2}
    w = rp.plan_writes(raw, rec.state, kernel_target=None, evict=rec.orphans)
    assert w.slot_gen == ((1, 0),)
    assert w.evict == (3,)
    assert w.target == Target(2, (2,))


def test_active_generation_without_listeners_falls_back_to_older() -> None:
    # Generation 2 was activated, then all its listeners died: 1 takes over.
    s = GroupState(capacity=4, slots={0: 1, 1: 1}, active=frozenset({1, 2}))
    assert rp.target(s) == Target(1, (0, 1))


def test_retire_is_idempotent() -> None:
    s = GroupState(capacity=2, slots={0: 1}, active=frozenset({1}))
    s1, freed = rp.retire(s, 1)
    s2, freed2 = rp.retire(s1, 1)
    assert freed == (0,) and freed2 == ()
    assert s1 == s2 and rp.target(s2) == Target()


@pytest.mark.parametrize("name", ["web", "a", "A-b_9", "x" * 63])
def test_group_names_accepted(name: str) -> None:
    assert rp.check_group_name(name) == name


@pytest.mark.parametrize("name", ["", "9web", "-x", "a.b", "a/b", "x" * 64, "a~b"])
def test_group_names_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid group name"):
        rp.check_group_name(name)


def test_core_imports_nothing_from_the_kernel() -> None:
    src = Path(rp.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    banned = {"socket", "bcc", "ctypes", "fcntl", "os", "subprocess"}
    assert not {m for m in imported if m.split(".")[0] in banned}
    assert not {m for m in imported if m.startswith("controlplane.kernel")}
