"""Read a file that must be a regular file, without ever blocking on what is not.

``open()`` of a FIFO blocks until someone opens the other end (issue 15: a
config or state file replaced by a FIFO hung ``validate`` and froze the agent
in ``open()``, deaf to SIGTERM). Opening with ``O_NONBLOCK`` returns at once
for every file type; ``fstat`` on the descriptor (the object opened, not a
name that may have changed since) then refuses anything but a regular file.
On a regular file ``O_NONBLOCK`` changes nothing.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["NotRegularFile", "read_regular"]

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
}


class NotRegularFile(OSError):
    """The path names something other than a regular file."""


def read_regular(path: str | Path, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """At most ``limit + 1`` bytes of ``path`` (the caller tells "too large" by
    the length). Raises OSError (FileNotFoundError, PermissionError,
    NotRegularFile; ELOOP for a symlink when ``follow_symlinks`` is False)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise NotRegularFile(errno.EINVAL, f"{kind}, not a regular file", str(path))
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
