"""The status the agent publishes: one immutable :class:`Snapshot`, replaced
after every decision and kernel view (readers on other threads see whole ones)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from controlplane.agent.snapshot import KernelView, Outcome, Snapshot
from controlplane.config import Config


def _count(counts: dict[str, int], out: Outcome | None) -> dict[str, int]:
    if out is None:
        return counts
    key = "ok" if out.ok else "failed"
    return {**counts, key: counts.get(key, 0) + 1}


class Published:
    def __init__(
        self,
        *,
        version: str,
        netns: str | None,
        config_path: str,
        started_at: float,
        drift_check_seconds: float,
        subsystem_stats: Callable[[], dict[str, Any]],
    ) -> None:
        self._snap = Snapshot(
            version=version,
            pid=os.getpid(),
            netns=netns,
            config_path=config_path,
            config_sha256="",
            started_at=started_at,
            table="",
            drift_check_seconds=drift_check_seconds,
        )
        self._subsystem_stats = subsystem_stats
        self.control_stats: Callable[[], dict[str, int]] = dict  # set once the socket exists
        self._running: Config | None = None
        self._sha = ""
        self._drift_repairs = 0

    def snapshot(self) -> Snapshot:
        """The latest snapshot (safe to call from any thread)."""
        return self._snap

    def running(self, cfg: Config, sha: str) -> None:
        """The config now running (recorded with the next snapshot)."""
        self._running, self._sha = cfg, sha

    def drift_repaired(self) -> None:
        self._drift_repairs += 1

    def record(
        self,
        *,
        apply: Outcome | None = None,
        reload: Outcome | None = None,
        kernel: KernelView | None = None,
        reuseport: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        s, cfg = self._snap, self._running
        self._snap = replace(
            s,
            config_sha256=self._sha,
            table=f"{cfg.table.family} {cfg.table.name}" if cfg else "",
            last_apply=apply or s.last_apply,
            last_reload=reload or s.last_reload,
            applies=_count(s.applies, apply),
            reloads=_count(s.reloads, reload),
            kernel=kernel or s.kernel,
            reuseport=reuseport if reuseport is not None else s.reuseport,
            invalidation=self._subsystem_stats() or s.invalidation,
            control=self.control_stats(),
            drift_repairs=self._drift_repairs,
            flowtable_names=tuple(ft.name for ft in cfg.flowtables) if cfg else s.flowtable_names,
        )
