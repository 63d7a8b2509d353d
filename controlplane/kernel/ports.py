"""The seams: one small Protocol per kernel adapter (knftables' ``Interface``).

The service layer (``controlplane.service``) and the agent talk to the kernel
only through these, so their orchestration runs against in-memory fakes in
unit tests (tests/unit/fake_nft.py) and against the real adapters in netns/VM
tests. A fake must fail where the kernel fails: raise the production
:class:`~controlplane.errors.KernelError` with the kernel's errno.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Protocol

from controlplane.config import Vlan
from controlplane.core import nft
from controlplane.core.plan import Observed
from controlplane.core.preflight import LinkInfo

# The BPF seam lives next to its adapter (H5): BpfMapsPort opens pinned maps
# and programs, BpfMapPort/BpfProgPort are what it returns.
from controlplane.kernel.bpf.ports import BpfMapPort, BpfMapsPort, BpfProgPort

__all__ = [
    "BpfMapPort",
    "BpfMapsPort",
    "BpfProgPort",
    "CtPort",
    "LockPort",
    "NftPort",
    "RtnlPort",
    "TeardownResult",
]


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
