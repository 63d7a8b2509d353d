"""The seam between the reuseport library and the kernel's BPF objects.

:class:`controlplane.reuseport.ReuseportGroup` (and the agent above it) reach
the kernel only through these Protocols. The real implementation is
:data:`controlplane.kernel.bpf.syscall.PINNED` (bpf(2) on pins); a unit test
passes a fake that keeps maps in memory and fails with the errno the kernel
would use (``tests/unit/fake_bpf.py``), so the orchestration runs without root.
"""

from __future__ import annotations

from typing import Protocol

from controlplane.kernel.bpf.syscall import MapInfo, ProgInfo

__all__ = ["BpfMapPort", "BpfMapsPort", "BpfProgPort"]


class BpfMapPort(Protocol):
    """One BPF map; keys and values are raw bytes of the map's sizes.

    Errors are :class:`controlplane.errors.KernelError` carrying the kernel's
    errno (E2BIG past an array's end or a full hash, EINVAL for a socket a
    sockarray refuses, EBUSY for a socket already in a sockarray).
    """

    @property
    def info(self) -> MapInfo: ...

    def lookup(self, key: bytes) -> bytes | None:
        """The value under ``key``, None if absent."""
        ...

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None: ...

    def delete(self, key: bytes) -> bool:
        """False if ``key`` was absent."""
        ...

    def all_keys(self) -> list[bytes]: ...

    def close(self) -> None: ...


class BpfProgPort(Protocol):
    """The group's SK_REUSEPORT program."""

    def info(self) -> ProgInfo: ...

    def attach_to(self, sock_fd: int) -> None:
        """Attach to the reuseport group of listening socket ``sock_fd``."""
        ...

    def close(self) -> None: ...


class BpfMapsPort(Protocol):
    """Opens pinned BPF objects; a missing pin raises KernelError with ENOENT,
    a pin this user may not open EACCES (or EPERM when bpf() itself is denied)."""

    def open_map(self, path: str) -> BpfMapPort: ...

    def open_prog(self, path: str) -> BpfProgPort: ...
