"""The seams: one small Protocol per kernel adapter (knftables' ``Interface``).

The service layer (``controlplane.service``) talks to the kernel only through
these, so its orchestration runs against in-memory fakes in unit tests
(tests/unit/fake_nft.py, tests/unit/fake_invalidation.py) and against the real
adapters in netns/VM tests. A fake must fail where the kernel fails: raise the
production :class:`~controlplane.errors.KernelError` with the kernel's errno.

The invalidation service's ports (:class:`InvalidationPorts`, the real ones
from :func:`controlplane.kernel.invalidation.open_ports`): rtnetlink events,
conntrack events, conntrack requests, a conntrack dump read in steps, route
lookups and the wait for readable descriptors (with its wake-up).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: `offloadctl watch` imports this, not the planner
    # The BPF seam lives next to its adapter (H5): BpfMapsPort opens pinned maps
    # and programs, BpfMapPort/BpfProgPort are what it returns.
    from controlplane.config import Vlan
    from controlplane.core import events as ev
    from controlplane.core import nft
    from controlplane.core.flowpath import Flow, Route
    from controlplane.core.plan import Observed
    from controlplane.core.preflight import LinkInfo
    from controlplane.kernel.bpf.ports import BpfMapPort, BpfMapsPort, BpfProgPort

__all__ = [
    "BpfMapPort",
    "BpfMapsPort",
    "BpfProgPort",
    "CtChangesPort",
    "CtDumpPort",
    "CtLookupPort",
    "CtPort",
    "CtRequestPort",
    "DeleteOutcome",
    "FlowChange",
    "InvalidationPorts",
    "LockPort",
    "NftPort",
    "RouteLookupPort",
    "RtnlEventsPort",
    "RtnlPort",
    "TeardownResult",
    "WaitPort",
]

_BPF = frozenset({"BpfMapPort", "BpfMapsPort", "BpfProgPort"})


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): the BPF ports pull in ctypes, which the watcher never needs.
    if name in _BPF:
        from controlplane.kernel.bpf import ports

        return getattr(ports, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class NftPort(Protocol):
    """One table of one network namespace's nftables."""

    def list_table(self, ref: nft.TableRef) -> Observed | None:
        """The table as the kernel lists it, or None when it does not exist."""
        ...

    def show(self, ref: nft.TableRef) -> str | None:
        """The table in nft's own text, for people (None: absent)."""
        ...

    def run(self, txn: nft.Transaction, check: bool = False) -> None:
        """Submit ``txn`` as one batch (all or nothing); ``check``: validate only.
        Raises KernelError(errno) when the kernel refuses."""
        ...

    def flowtables_supported(self) -> tuple[bool, str]:
        """Whether this kernel takes a flowtable, and why (not)."""
        ...


class RtnlPort(Protocol):
    """Links of one namespace (H4b's topology adapter implements the rest)."""

    def links(self, vlan_names: Iterable[str] = ()) -> Mapping[str, LinkInfo]:
        """Every link by name; VLAN details filled in for ``vlan_names``."""
        ...

    def bridge_ports(self, bridge: str) -> list[str]: ...

    def create_vlans(self, vlans: list[Vlan]) -> list[str]:
        """Create these VLANs in order (up); all-or-nothing; names created."""
        ...

    def remove_links(self, names: list[str]) -> None: ...

    def vlans_supported(self) -> tuple[bool, str]:
        """Whether this kernel can create a VLAN device, and why (not)."""
        ...


class TeardownResult(Protocol):
    @property
    def deleted(self) -> int: ...
    @property
    def examined(self) -> int: ...
    @property
    def recreated(self) -> int: ...
    @property
    def elapsed(self) -> float: ...


class CtPort(Protocol):
    """Conntrack of one namespace."""

    def teardown_flows_via(self, devices: set[str]) -> TeardownResult:
        """Take the flows through ``devices`` off the fast path."""
        ...


class LockPort(Protocol):
    """Serialises observe → plan → commit per network namespace."""

    def __enter__(self) -> object: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


# -- the invalidation service's ports ------------------------------------------------


class RtnlEventsPort(Protocol):
    """A subscription to one namespace's rtnetlink notifications, decoded into
    events (:class:`controlplane.kernel.rtnl.watcher.Watcher`). It keeps no cache:
    the engine's is the one topology cache."""

    def open(self) -> None:
        """Subscribe (no dump: :meth:`snapshot` is the dump)."""
        ...

    def close(self) -> None: ...

    def fileno(self) -> int:
        """Readable when notifications are queued; KernelError(EBADF) when not open."""
        ...

    def poll(self, limit: int) -> list[ev.Event]:
        """What is queued, at most ``limit`` datagrams, never blocking; an overflow
        or a lost socket is ``EventsLost(source="rtnl")`` (the socket is drained or
        reopened)."""
        ...

    def snapshot(self, *, lost: bool = True) -> ev.Snapshot:
        """A fresh dump of links, neighbours and FDB as one ``Snapshot``."""
        ...


class FlowChange(Protocol):
    """One conntrack notification: ``flow`` appeared/changed or (``gone``) died;
    ``new``: a NEW (created) event."""

    @property
    def flow(self) -> Flow: ...
    @property
    def gone(self) -> bool: ...
    @property
    def new(self) -> bool: ...


class CtChangesPort(Protocol):
    """A subscription to one namespace's conntrack NEW/UPDATE/DESTROY events
    (:class:`controlplane.kernel.ctnetlink.events.CtEvents`), and the dumps that
    go with it (same protocol filter)."""

    @property
    def protocols(self) -> frozenset[int]:
        """The L4 protocols reported (the others are dropped)."""
        ...

    def open(self) -> None: ...

    def close(self) -> None: ...

    def fileno(self) -> int: ...

    def poll(self, limit: int = 65_536) -> tuple[Sequence[FlowChange], bool]:
        """Queued notifications and whether some were lost (then re-dump)."""
        ...

    def dump(self) -> list[Flow]: ...

    def dump_each(self, on_flow: Callable[[Flow], None]) -> None:
        """The dump streamed, one entry at a time (no 100,000-entry list)."""
        ...


class DeleteOutcome(Protocol):
    @property
    def deleted(self) -> int: ...
    @property
    def already_gone(self) -> int: ...


class CtRequestPort(Protocol):
    """Conntrack requests of one namespace
    (:class:`controlplane.kernel.ctnetlink.conntrack.ConntrackSocket`)."""

    last_deleted: list[Flow]  # what the last :meth:`delete` deleted

    def statuses(self, flows: Iterable[Flow]) -> list[tuple[Flow, int | None]]:
        """Each entry's status bits now (None: no such entry), batched."""
        ...

    def delete(self, flows: Iterable[Flow]) -> DeleteOutcome:
        """Delete by orig tuple + zone + id; ENOENT counts as already gone."""
        ...

    def reinject(self, flows: Iterable[Flow]) -> tuple[int, int]:
        """Re-create deleted entries: (created, already there: EEXIST)."""
        ...

    def close(self) -> None: ...


class CtDumpPort(Protocol):
    """A conntrack dump read in bounded steps
    (:class:`controlplane.kernel.ctnetlink.conntrack.DumpStream`)."""

    def fileno(self) -> int:
        """Readable while the dump has more to give."""
        ...

    def begin(self) -> None:
        """Ask for a dump of every entry; an unfinished one is abandoned."""
        ...

    def read(self, budget: int) -> tuple[list[Flow], bool]:
        """Entries received so far (about ``budget`` at most, never blocking) and
        whether the dump is complete; KernelError when the kernel fails it."""
        ...

    def close(self) -> None: ...


class RouteLookupPort(Protocol):
    """``ip route get`` for many addresses over one socket."""

    def lookup(self, addresses: Iterable[str]) -> dict[str, Route | None]:
        """The kernel's route to each address (None: unreachable)."""
        ...

    def close(self) -> None: ...


class WaitPort(Protocol):
    """Waiting for readable descriptors, and a wake-up for it (``select`` and a pipe)."""

    def fileno(self) -> int:
        """Readable after :meth:`wake` (for a caller that selects itself)."""
        ...

    def wait(self, fds: Sequence[int], timeout: float | None) -> Collection[int]:
        """The descriptors of ``fds`` readable within ``timeout`` (None: no limit);
        a pending wake-up is consumed."""
        ...

    def wake(self) -> None:
        """Make a blocked :meth:`wait` return (safe in a signal handler)."""
        ...

    def close(self) -> None: ...


class CtLookupPort(Protocol):
    """The conntrack entries of a few addresses without a full dump
    (:class:`controlplane.kernel.ctnetlink.lookup.CtLookup`: kernel-filtered dumps)."""

    def entries_of(self, addresses: Iterable[str]) -> list[Flow]:
        """Every entry whose original or reply source is one of ``addresses``."""
        ...


@dataclass
class InvalidationPorts:
    """Everything the invalidation service touches in the kernel, for one namespace.

    ``lookup`` None: topology events wait for the end of the start-up dump
    (``service/startup.py`` acts on them during it when it can look entries up)."""

    rtnl: RtnlEventsPort
    changes: CtChangesPort
    conntrack: CtRequestPort
    dump: CtDumpPort
    routes: RouteLookupPort
    waiter: WaitPort
    lookup: CtLookupPort | None = None
