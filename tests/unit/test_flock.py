"""A stopped or hung lock holder costs the next writer a named error, not a hang."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from controlplane.errors import EnvironmentProblem
from controlplane.kernel.flock import lock_exclusive


def test_a_held_lock_is_an_error_naming_it_after_the_wait(tmp_path: Path) -> None:
    path = tmp_path / "group.lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    waiter = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(EnvironmentProblem, match="held the group lock for 0 s"):
            lock_exclusive(waiter, 0.05, "the group lock")
        os.close(holder)  # closing releases it
        holder = -1
        lock_exclusive(waiter, 0.05, "the group lock")
        with pytest.raises(BlockingIOError):  # now the waiter holds it
            other = os.open(path, os.O_RDWR)
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(other)
    finally:
        os.close(waiter)
        if holder >= 0:
            os.close(holder)
