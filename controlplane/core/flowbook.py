"""Which conntrack entries the invalidation index takes as offloaded, and the order
teardowns check them in: the service's bookkeeping beside the engine's index.

Pure: the service (``service/invalidation.py``) hands it flows as the kernel sent
them and the kernel's answers, and carries out what it returns.

- **Possibly offloaded** (:meth:`FlowBook.indexed`): the kernel sets IPS_OFFLOAD
  WITHOUT an event when the packet that offloads an entry changes nothing else in
  it (docs/kernel-facts.md, "How a flow caches its path": "Offloading is silent").
  So every TCP and UDP entry
  (what flowtables offload) is indexed as if offloaded; a teardown first asks the
  kernel which of its flows are offloaded now and leaves the others alone.
- **Re-created entries** (:meth:`FlowBook.torn_down`): the kernel re-offloads an
  entry we re-created on its next forwarded packet, silently; its NEW event (our
  own re-create's echo) is the last news of it, so it is indexed as offloaded.
- **Idle entries** (:meth:`FlowBook.checked`): indexed entries a teardown found
  NOT offloaded. The next teardown checks them after the others
  (:meth:`FlowBook.order`): a host's idle UDP entries (dozens: DNS...) must not
  delay the repair of its live flows. Any news of an entry makes it live again.
- ``only_offloaded`` False is the test-only switch
  (``OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED``, :data:`TESTING_ALL_OFFLOADED`): every
  entry is taken as offloaded and no teardown asks the kernel first, because the
  test machines' host kernel has no flowtables.

Bounded: both books keep at most ``bound`` entries, oldest forgotten first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from controlplane.core.flowpath import IPS_OFFLOAD, CtTuple, Flow
from controlplane.core.reinject import IPPROTO_TCP, IPPROTO_UDP

__all__ = ["PORT_PROTOCOLS", "TESTING_ALL_OFFLOADED", "FlowBook", "only_offloaded"]

# What flowtables offload; both may be offloaded without an event.
PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP})

# The test-only switch's environment variable (``offloadctl watch``, ``flows
# teardown`` and the agent read it through :func:`only_offloaded`). Never set it
# in production: teardowns would touch flows on the classic path.
TESTING_ALL_OFFLOADED = "OFFLOADCTL_TESTING_ALL_FLOWS_OFFLOADED"

_Key = tuple[int, CtTuple]  # (zone, original tuple): how conntrack finds an entry


def only_offloaded(environ: Mapping[str, str]) -> bool:
    """False only when the test-only switch is set to ``1``."""
    return environ.get(TESTING_ALL_OFFLOADED) != "1"


def _as_offloaded(flow: Flow) -> Flow:
    return flow if flow.status & IPS_OFFLOAD else replace(flow, status=flow.status | IPS_OFFLOAD)


class FlowBook:
    """The index's view of conntrack entries, and the teardowns' order."""

    def __init__(self, *, only_offloaded: bool = True, bound: int = 65_536) -> None:
        if bound < 1:
            raise ValueError(f"bound: {bound!r} must be at least 1")
        self.only_offloaded = only_offloaded
        self.bound = bound
        self._recreated: dict[_Key, None] = {}
        self._idle: dict[_Key, None] = {}

    # -- what the index takes ---------------------------------------------------------

    def indexed(self, flow: Flow) -> Flow:
        """A dumped entry (start-up, resync, prune) as the index takes it: a TCP or UDP
        entry counts as possibly offloaded (and every entry under the test switch)."""
        if not self.only_offloaded or flow.orig.proto in PORT_PROTOCOLS:
            return _as_offloaded(flow)
        return flow

    def changed(self, flow: Flow, *, new: bool, gone: bool) -> Flow:
        """A conntrack event's entry as the index takes it (``new``: a NEW event,
        ``gone``: DESTROY). Any news makes an idle entry live again."""
        key = (flow.zone, flow.orig)
        self._idle.pop(key, None)
        if new and self._recreated.pop(key, 0) is None:
            return _as_offloaded(flow)  # our re-create's echo: the last news we get of it
        return flow if gone and self.only_offloaded else self.indexed(flow)

    # -- teardowns ---------------------------------------------------------------------

    def order(self, flows: Iterable[Flow]) -> tuple[list[Flow], list[Flow]]:
        """``flows`` to tear down in two groups, checked and torn down in this order:
        those not found idle last time, then those that were (each check costs a
        round of CT_GET decoding; what users wait for is the live flows' repair)."""
        live: list[Flow] = []
        idle: list[Flow] = []
        for flow in flows:
            (idle if (flow.zone, flow.orig) in self._idle else live).append(flow)
        return live, idle

    @property
    def asks_kernel(self) -> bool:
        """Whether a teardown asks the kernel which flows are offloaded now (not
        under the test switch: there every flow is)."""
        return self.only_offloaded

    def checked(self, statuses: Iterable[tuple[Flow, int | None]]) -> tuple[list[Flow], list[Flow]]:
        """The kernel's answer for a group (status bits, ``None``: the entry is gone):
        (offloaded: tear down, idle: leave alone). Idle entries stay indexed (the kernel
        may offload them later, silently): the caller re-indexes them, as returned."""
        offloaded: list[Flow] = []
        idle: list[Flow] = []
        for flow, status in statuses:
            if status is None:
                continue
            key = (flow.zone, flow.orig)
            if status & IPS_OFFLOAD:
                self._idle.pop(key, None)
                offloaded.append(flow)
            else:
                self._idle.pop(key, None)
                self._idle[key] = None  # newest last: forgotten last
                idle.append(_as_offloaded(flow))
        _bound(self._idle, self.bound)
        return offloaded, idle

    def torn_down(self, deleted: Iterable[Flow]) -> None:
        """These entries were deleted and are about to be re-created by us."""
        for flow in deleted:
            self._recreated[(flow.zone, flow.orig)] = None
        _bound(self._recreated, self.bound)

    def __len__(self) -> int:
        """Entries remembered (re-created + idle): bounded by ``2 * bound``."""
        return len(self._recreated) + len(self._idle)


def _bound(book: dict[_Key, None], bound: int) -> None:
    while len(book) > bound:  # oldest first out
        del book[next(iter(book))]
