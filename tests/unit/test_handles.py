"""The one life cycle of kernel handles (controlplane/kernel/handles.py), on real descriptors."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from controlplane.kernel.bpf.fd_handover import HandoverServer
from controlplane.kernel.handles import Opening, OwnedFd


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def test_an_owned_fd_is_closed_by_the_with_block_and_only_once() -> None:
    r, w = os.pipe()
    os.close(w)
    with OwnedFd(r) as owned:
        assert owned.fileno() == r
    assert owned.closed and not _is_open(r)
    # The number is free again: the next descriptor the process opens may get it.
    # A second close must not close that one.
    reused = os.open(os.devnull, os.O_RDONLY)
    try:
        assert reused == r  # POSIX: the lowest free number
        owned.close()
        assert _is_open(reused)
    finally:
        os.close(reused)
    with pytest.raises(ValueError, match="already closed"):
        owned.fileno()


def test_an_owned_fd_is_closed_when_the_block_raises() -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(RuntimeError), OwnedFd(r):
        raise RuntimeError("boom")
    assert not _is_open(r)


class _Pipe(Opening):
    """The smallest Opening: a pipe made by open(), not by the constructor."""

    def __init__(self) -> None:
        self.ends = (OwnedFd(), OwnedFd())

    def open(self) -> None:
        r, w = os.pipe()
        self.ends = (OwnedFd(r), OwnedFd(w))

    def close(self) -> None:
        for end in self.ends:
            end.close()


def test_an_opening_handle_is_opened_by_entering_and_closed_by_leaving() -> None:
    pipe = _Pipe()
    assert all(end.closed for end in pipe.ends)  # built, not opened
    with pipe as entered:
        assert entered is pipe
        fds = [end.fileno() for end in pipe.ends]
        assert all(_is_open(fd) for fd in fds)
    assert not any(_is_open(fd) for fd in fds)


def test_a_handover_server_closed_twice_leaves_its_successors_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "handover.sock")
    old = HandoverServer(path)
    old.close()
    assert not os.path.exists(path)
    with HandoverServer(path):  # the next agent listens on the same path
        old.close()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert not os.path.exists(path)
