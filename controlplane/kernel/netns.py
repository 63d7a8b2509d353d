"""Run code inside a named network namespace (``ip netns`` conventions).

libnftables binds to the namespace that is current when ``Nftables()`` is
created and pyroute2 sockets to the one current when they are opened, so
adapters create their handles inside :func:`entered`. ``setns`` only moves the
calling thread, which is what we want: other threads keep their namespace.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

from controlplane.errors import EnvironmentProblem

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000


_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """setns(2) for the calling thread (os.setns only exists from Python 3.12)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def unshare_net() -> None:
    """Move the calling process into a new, empty network namespace."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def netns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise EnvironmentProblem(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_DIR, name)


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(f"{action} needs root (CAP_NET_ADMIN); run with sudo")


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Enter namespace ``name`` for the duration of the block (no-op for None)."""
    if name is None:
        yield
        return
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"network namespace {name!r} does not exist (no {path}); create it with"
            f" 'ip netns add {name}'"
        ) from None
    except PermissionError:
        raise EnvironmentProblem(f"cannot open network namespace {name!r}: need root") from None
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            setns(target)
        except PermissionError:
            raise EnvironmentProblem(
                f"cannot enter network namespace {name!r}: need root (CAP_SYS_ADMIN)"
            ) from None
        try:
            yield
        finally:
            setns(original)
    finally:
        os.close(target)
        os.close(original)
