"""The kernel view in the agent's status: a periodic full view (a conntrack
dump, taken off the loop thread) and the table part a ``status`` request
refreshes inline; whichever is newer wins, field group by field group."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from controlplane.agent.ports import Observer
from controlplane.agent.published import Published
from controlplane.agent.snapshot import KernelView
from controlplane.config import Config
from controlplane.errors import ControlPlaneError, one_line


def _table_part(view: KernelView) -> dict[str, Any]:
    return {
        "table_at": view.table_at,
        "table_present": view.table_present,
        "flowtables": view.flowtables,
        "counters": view.counters,
        "reuseport": view.reuseport,
    }


def with_table(current: KernelView, part: KernelView) -> KernelView:
    """``current`` with the table part of ``part`` (a fresher table reading); an
    error of the full view stays until the table part is newer than it."""
    error = part.error or (current.error if current.at > part.table_at else None)
    return replace(current, **_table_part(part), error=error)


def newer_view(current: KernelView, view: KernelView) -> KernelView | None:
    """What publishing a full ``view`` makes of ``current``: None if it is not
    newer; its table part replaced by ``current``'s if a status request read the
    table since."""
    if view.at <= current.at:
        return None
    if view.table_at < current.table_at:
        return replace(view, **_table_part(current))
    return view


class KernelViews:
    def __init__(
        self,
        observer: Observer,
        netns: str | None,
        published: Published,
        running: Callable[[], Config | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._observer = observer
        self._netns = netns
        self._published = published
        self._running = running
        self._clock = clock

    def observe(self) -> KernelView | None:
        """A fresh full view (safe off the loop thread: the observer opens its
        own handles, and the running config is read once)."""
        cfg = self._running()
        if cfg is None:
            return None
        try:
            return self._observer.observe(cfg, self._netns)
        except ControlPlaneError as exc:
            kernel = self._published.snapshot().kernel
            return replace(kernel, at=self._clock(), error=one_line(exc))

    def refresh(self) -> None:
        view = self.observe()
        if view is not None:
            self._published.record(kernel=view)

    def refresh_table(self) -> None:
        """The table part (present, flowtable devices, counters, reuseport groups)
        on the loop thread; conntrack counts stay the periodic view's."""
        cfg = self._running()
        if cfg is None:
            return
        kernel = self._published.snapshot().kernel
        try:
            part = self._observer.observe_table(cfg, self._netns)
        except ControlPlaneError as exc:
            part = replace(kernel, table_at=self._clock(), error=one_line(exc))
        self._published.record(kernel=with_table(kernel, part))

    def publish(self, view: KernelView) -> None:
        merged = newer_view(self._published.snapshot().kernel, view)
        if merged is not None:
            self._published.record(kernel=merged)
