"""The life cycle of a kernel handle (socket, descriptor, lock), written once.

Every handle is closed by ``close()`` or by leaving a ``with`` block, and
closing twice is harmless (a loop that closes on error and again on exit must
not close a descriptor number the process has reused meanwhile). Netlink
sockets build on this in ``kernel/netlink.py`` (``NetlinkSocket``: opened in a
namespace by its constructor; ``Subscription``: a multicast subscription opened
by ``open()``).
"""

from __future__ import annotations

import os
from typing import Self

__all__ = ["Closing", "Opening", "OwnedFd"]


class Closing:
    """Acquired by the constructor; ``with`` closes it on the way out.

    Subclasses implement :meth:`close`, idempotently.
    """

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Opening(Closing):
    """Acquired by :meth:`open` (entering a ``with`` block calls it), not by the
    constructor: a watcher or a lock can be built, handed around, then opened."""

    def open(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.open()
        return self


class OwnedFd(Closing):
    """One file descriptor (``-1``: none), closed once."""

    def __init__(self, fd: int = -1) -> None:
        self._fd = fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("file descriptor already closed")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
