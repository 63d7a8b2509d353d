"""A bounded wait for an flock: a holder that is stopped or hung must cost the
next writer an error that names the lock, never a hang."""

from __future__ import annotations

import fcntl
import time

from controlplane.errors import EnvironmentProblem

__all__ = ["lock_exclusive"]


def lock_exclusive(fd: int, wait: float, what: str) -> None:
    """Take an exclusive flock on *fd* within *wait* seconds, or raise
    EnvironmentProblem naming *what* (the caller still owns *fd*)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise EnvironmentProblem(
                    f"another process has held {what} for {wait:.0f} s"
                ) from None
            time.sleep(0.005)  # flock has no timed wait; poll against a deadline
