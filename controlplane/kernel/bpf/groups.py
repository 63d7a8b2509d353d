"""Reuseport groups of one network namespace, as the agent's apply sees them:
load, unload, and which ones the kernel holds (the :class:`GroupsPort` of
``controlplane.service.reuseport``). Thin over :mod:`.loader`."""

from __future__ import annotations

import os
from collections.abc import Iterable

from controlplane.config import ReuseportGroup
from controlplane.errors import EnvironmentProblem
from controlplane.kernel.bpf import loader

__all__ = ["BpfGroups"]


class BpfGroups:
    def __init__(self, netns: str | None) -> None:
        self.netns = netns

    def load(self, group: ReuseportGroup, bpffs: str) -> loader.LoadResult:
        return loader.load_group(
            group.name,
            netns=self.netns,
            bpffs=bpffs,
            max_listeners=group.max_listeners,
            drop_when_no_target=group.drop_when_no_target,
        )

    def unload(self, name: str, bpffs: str) -> loader.UnloadResult:
        return loader.unload_group(name, netns=self.netns, bpffs=bpffs)

    def held(self, names: Iterable[str], bpffs: str) -> frozenset[str]:
        """Which of ``names`` have a pin directory on the bpffs at ``bpffs``.

        Only a missing directory on a mounted bpffs means "not held"; no bpffs
        there (``ip netns exec`` hides one under /sys) or a refused lookup
        raises EnvironmentProblem: the group may well still be pinned."""
        label = loader.netns_label(self.netns)
        loader.require_bpffs(bpffs)
        held: set[str] = set()
        for name in names:
            path = loader.group_pin_dir(bpffs, label, name)
            try:
                os.stat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise EnvironmentProblem(f"cannot look up {path}: {exc.strerror}") from None
            held.add(name)
        return frozenset(held)
