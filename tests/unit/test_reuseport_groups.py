"""Which reuseport groups an apply loads, unloads, forgets or keeps (core), and
the service that runs that decision through a port whose fake fails where the
kernel does: a group is only forgotten when the kernel provably holds none of it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.config import ReuseportConfig, ReuseportGroup
from controlplane.core.reuseport_groups import owned_after, plan_groups
from controlplane.errors import EnvironmentProblem, KernelError
from controlplane.service.reuseport import ReuseportGroups

NAMES = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f"]), max_size=6)


@given(NAMES, NAMES, st.none() | NAMES, NAMES)
def test_a_group_is_forgotten_only_when_provably_gone(
    declared: list[str], owned: list[str], held: list[str] | None, failed: list[str]
) -> None:
    changes = plan_groups(declared, owned, held)
    stale = set(owned) - set(declared)
    assert changes.load == tuple(dict.fromkeys(declared))
    # Every stale group lands in exactly one of unload / forget / unknown.
    parts = [set(changes.unload), set(changes.forget), set(changes.unknown)]
    assert set().union(*parts) == stale and sum(map(len, parts)) == len(stale)
    if held is None:
        assert set(changes.unknown) == stale and not changes.unload and not changes.forget
    else:
        assert set(changes.unload) <= set(held) and not set(changes.forget) & set(held)
    after = set(owned_after(changes, failed))
    assert set(declared) <= after
    assert not after & set(changes.forget)  # forgotten: provably gone
    assert set(changes.unknown) <= after  # unreadable: still ours
    assert set(changes.unload) & set(failed) <= after  # removal failed: still ours
    assert not after & (set(changes.unload) - set(failed))  # removed: not ours


BPFFS = "/sys/fs/bpf"


@dataclass
class Loaded:
    pin_dir: str
    prog_id: int
    capacity: int
    already_loaded: bool


@dataclass
class Unloaded:
    live_listeners: int


@dataclass
class FakeGroups:
    """Pinned groups by bpffs; errors as ``kernel/bpf/loader`` raises them."""

    pinned: dict[str, set[str]] = field(default_factory=lambda: {BPFFS: set()})
    denied: bool = False  # lookups refused (EACCES), as for a non-root agent
    refuse_unload: set[str] = field(default_factory=set)  # the kernel refuses these

    def _mounted(self, bpffs: str) -> set[str]:
        if self.denied:
            raise EnvironmentProblem(f"permission denied looking up {bpffs} (uid 1000)")
        if bpffs not in self.pinned:
            raise EnvironmentProblem(f"no bpffs mounted at {bpffs}")
        return self.pinned[bpffs]

    def load(self, group: ReuseportGroup, bpffs: str) -> Loaded:
        groups = self._mounted(bpffs)
        already = group.name in groups
        groups.add(group.name)
        return Loaded(f"{bpffs}/offloadctl/host/{group.name}", 7, group.max_listeners, already)

    def unload(self, name: str, bpffs: str) -> Unloaded:
        groups = self._mounted(bpffs)
        if name in self.refuse_unload:
            raise KernelError("remove pins", "Operation not permitted", 1)
        if name not in groups:
            raise EnvironmentProblem(f"reuseport group {name!r} is not loaded in host")
        groups.remove(name)
        return Unloaded(0)

    def held(self, names: Iterable[str], bpffs: str) -> frozenset[str]:
        return frozenset(self._mounted(bpffs)) & frozenset(names)


@dataclass(frozen=True)
class Owned:
    reuseport_groups: tuple[str, ...]
    reuseport_bpffs: str = BPFFS


def declare(*names: str) -> ReuseportConfig:
    return ReuseportConfig(groups=[ReuseportGroup(name=n) for n in names])


def test_declared_groups_load_and_dropped_ones_unload() -> None:
    port = FakeGroups()
    out = ReuseportGroups(port).reconcile(declare("web", "api"), None)
    assert out.owned == ("api", "web") and set(out.facts) == {"web", "api"}
    assert out.summary == ("+ reuseport group web (prog id 7)", "+ reuseport group api (prog id 7)")
    out = ReuseportGroups(port).reconcile(declare("web"), Owned(("api", "web")))
    assert out.owned == ("web",) and out.summary == ("- reuseport group api",)
    assert port.pinned[BPFFS] == {"web"} and not out.problems


def test_a_group_already_gone_is_forgotten_quietly() -> None:
    out = ReuseportGroups(FakeGroups()).reconcile(declare(), Owned(("old",)))
    assert out.owned == () and out.summary == () and out.problems == ()


@pytest.mark.parametrize(
    ("port", "why"),
    [
        (FakeGroups(pinned={}), "no bpffs mounted at /sys/fs/bpf"),
        (FakeGroups(pinned={BPFFS: {"old"}}, denied=True), "permission denied"),
        (FakeGroups(pinned={BPFFS: {"old"}}, refuse_unload={"old"}), "Operation not permitted"),
    ],
)
def test_a_group_that_cannot_be_removed_stays_ours_and_is_reported(
    port: FakeGroups, why: str
) -> None:
    """Was: every EnvironmentProblem meant "already gone", and the state dropped it."""
    out = ReuseportGroups(port).reconcile(declare(), Owned(("old",)))
    assert out.owned == ("old",)
    assert len(out.problems) == 1 and "reuseport group old" in out.problems[0]
    assert why in out.problems[0] and out.summary == ()


def test_remove_all_names_what_it_could_not_remove() -> None:
    port = FakeGroups(pinned={BPFFS: {"web", "old"}}, refuse_unload={"old"})
    done, problems = ReuseportGroups(port).remove_all(declare("web"), Owned(("old", "gone")))
    assert done == ["unloaded reuseport group web (0 live listeners)"]
    assert problems == [
        "reuseport group old left in place: remove pins: Operation not permitted (EPERM)"
    ]
