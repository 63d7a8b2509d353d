"""One writer per network namespace: flock on a file named by the namespace's
identity (nsfs device + inode), so two names for one namespace share a lock."""

from __future__ import annotations

import os

from controlplane.errors import EnvironmentProblem
from controlplane.kernel.flock import lock_exclusive
from controlplane.kernel.handles import Opening, OwnedFd
from controlplane.kernel.netns import netns_path

__all__ = ["LOCK_DIR", "NetnsLock", "netns_identity"]

LOCK_DIR = "/run/offloadctl"
WAIT_SECONDS = 60.0


def netns_identity(netns: str | None) -> tuple[int, int]:
    path = "/proc/thread-self/ns/net" if netns is None else netns_path(netns)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"network namespace {netns!r} does not exist (no {path}); create it with"
            f" 'ip netns add {netns}'"
        ) from None
    return st.st_dev, st.st_ino


class NetnsLock(Opening):
    """Held from :meth:`open` (entering a ``with`` block) to :meth:`close`."""

    def __init__(self, netns: str | None, wait: float = WAIT_SECONDS) -> None:
        self.netns = netns
        self.wait = wait
        self._fd = OwnedFd()

    @property
    def path(self) -> str:
        dev, ino = netns_identity(self.netns)
        return os.path.join(LOCK_DIR, f"netns-{dev}-{ino}.lock")

    def open(self) -> None:
        path = self.path
        try:
            os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
            fd = OwnedFd(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise EnvironmentProblem(f"cannot open lock {path}: {exc.strerror}") from None
        try:
            lock_exclusive(fd.fileno(), self.wait, path)
        except BaseException:
            fd.close()
            raise
        self._fd = fd

    def close(self) -> None:
        self._fd.close()  # closing releases the flock


class VerifiedStamp:
    """What the last no-op apply verified in this namespace: the ruleset
    generation read *before* its listing, and the digest of the desired table.
    Same generation and digest now → nothing changed since, no listing needed."""

    def __init__(self, netns: str | None) -> None:
        dev, ino = netns_identity(netns)
        self.path = os.path.join(LOCK_DIR, f"netns-{dev}-{ino}.verified")

    def read(self) -> str | None:
        try:
            with open(self.path) as f:
                return f.read()
        except OSError:
            return None

    def write(self, value: str) -> None:
        tmp = f"{self.path}.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(value)
            os.replace(tmp, self.path)
        except OSError:
            pass  # only an optimisation: the next apply lists the table instead
