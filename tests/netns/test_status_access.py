"""What ``status``/``flows`` say to a user who is not root (issue 14 item 5):
a root-only control socket that cannot even be stat'ed is not said to exist."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.agent.control import connect
from controlplane.errors import EnvironmentProblem

NOBODY = 65534


def as_nobody(path: Path) -> str:
    """``connect(path)``'s error message in a child running as uid/gid 65534."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        message = "connected"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            client = connect(path)
            message = "no agent" if client is None else "connected"
        except EnvironmentProblem as exc:
            message = str(exc)
        finally:
            os.write(w, message.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may search (pytest's tmp_path is under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="offloadctl-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_root_only_directory_and_socket(public_dir: Path) -> None:
    tmp_path = public_dir
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    # No socket at all, in a directory nobody else may search: cannot tell.
    assert as_nobody(closed / "ns.sock") == (
        f"cannot tell whether an agent answers on {closed / 'ns.sock'}: {closed} is not"
        f" accessible to uid {NOBODY}; run as root"
    )
    # A root-only socket in a readable directory: it exists, and says so.
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    path = open_dir / "ns.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        path.chmod(0o600)
        listener.listen(1)
        assert as_nobody(path) == (
            f"an agent's control socket {path} exists but is root only; run as root"
        )
    finally:
        listener.close()
    assert as_nobody(open_dir / "other.sock") == "no agent"
