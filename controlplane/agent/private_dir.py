"""A directory the agent writes files into: only we may write it.

Anyone else who can write the directory can swap what we put there (the
control socket) or plant a symlink where we are about to write (the state
file's temp name: issue 15, F11), whatever ``fs.protected_symlinks`` says.
So the socket directory and the state directory are checked the same way:
a real directory (not a symlink), owned by our uid, not writable by group
or others.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from controlplane.errors import EnvironmentProblem

__all__ = ["check", "ensure"]


def check(directory: Path, what: str, option: str) -> None:
    """Refuse ``directory`` unless only we can write it. ``what`` names it in
    the message ("control socket directory"), ``option`` the flag that moves it."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise EnvironmentProblem(f"{what} {directory} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise EnvironmentProblem(f"{what} {directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise EnvironmentProblem(
            f"{what} {directory} is owned by uid {st.st_uid}, not by us"
            f" (uid {os.geteuid()}); use a root-owned directory"
        )
    if st.st_mode & 0o022:
        raise EnvironmentProblem(
            f"{what} {directory} is writable by group or others"
            f" (mode {stat.S_IMODE(st.st_mode):04o}); chmod go-w it or pick another {option}"
        )


def ensure(directory: Path, what: str, option: str) -> None:
    """Create ``directory`` (0700) if missing, then :func:`check` it."""
    if not os.path.lexists(directory):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    check(directory, what, option)
