"""Get listening sockets of processes that cannot import our library.

Two ways, both ending with the agent holding a duplicate of the listener's
file descriptor (same socket), which it registers and then closes; the
sockarray refers to the socket, not to the descriptor, so the listener stays
registered for as long as its owner keeps it open.

- **SCM_RIGHTS**: the service connects to the agent's Unix socket
  (``SOCK_SEQPACKET``) and sends one message per listener::

      register generation=<G>\\n        + exactly one fd in SCM_RIGHTS

  and reads the reply, ``ok slot=<S>\\n`` or ``error <message>\\n``. Any
  language with sendmsg() can do this; :func:`send_listener` is the Python
  client.
- **pidfd_getfd(2)**: the agent takes fd ``F`` of process ``P`` itself
  (:func:`take_fd`); needs ptrace rights over ``P`` (root has them).
"""

from __future__ import annotations

import array
import contextlib
import errno as _errno
import os
import re
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.errors import ControlPlaneError, EnvironmentProblem, KernelError
from controlplane.kernel.bpf.syscall import pidfd_getfd
from controlplane.kernel.handles import Closing

__all__ = [
    "HandoverResult",
    "HandoverServer",
    "format_reply",
    "format_request",
    "parse_reply",
    "parse_request",
    "send_listener",
    "take_fd",
]

_MAX_MSG = 256
_REQUEST_RE = re.compile(rb"^register generation=([0-9]{1,10})\n?$")
_REPLY_OK_RE = re.compile(rb"^ok slot=([0-9]{1,10})\n?$")


def take_fd(pid: int, fd: int) -> int:
    """Duplicate fd ``fd`` of process ``pid`` into this process (pidfd_getfd)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise EnvironmentProblem(f"no process with pid {pid}") from None
    except PermissionError:
        raise EnvironmentProblem(f"not allowed to open pid {pid} (need root)") from None
    try:
        return pidfd_getfd(pidfd, fd)
    except KernelError as exc:
        if exc.errno == _errno.EBADF:
            raise EnvironmentProblem(f"process {pid} has no open fd {fd}") from None
        if exc.errno == _errno.EPERM:
            raise EnvironmentProblem(
                f"not allowed to take fds of process {pid}: needs ptrace access"
                " (root or CAP_SYS_PTRACE; check kernel.yama.ptrace_scope)"
            ) from None
        if exc.errno == _errno.ESRCH:
            raise EnvironmentProblem(f"process {pid} exited") from None
        raise
    finally:
        os.close(pidfd)


# --- wire format (pure) ---------------------------------------------------


def format_request(generation: int) -> bytes:
    return f"register generation={generation}\n".encode()


def parse_request(data: bytes) -> int:
    m = _REQUEST_RE.match(data)
    if not m:
        raise ValueError(f"expected 'register generation=<N>', got {data[:60]!r}")
    return int(m.group(1))


def format_reply(slot: int | None, error: str | None = None) -> bytes:
    if error is not None:
        return ("error " + " ".join(error.split()))[: _MAX_MSG - 1].encode() + b"\n"
    return f"ok slot={slot}\n".encode()


def parse_reply(data: bytes) -> int:
    """The slot of an ``ok`` reply; KernelError carrying the agent's message otherwise."""
    m = _REPLY_OK_RE.match(data)
    if m:
        return int(m.group(1))
    text = data.decode(errors="replace").strip()
    if text.startswith("error "):
        text = text[len("error ") :]
    raise KernelError("hand listener to the agent", text or "connection closed without a reply")


# --- agent side -----------------------------------------------------------


@dataclass(frozen=True)
class HandoverResult:
    pid: int  # sender, from SO_PEERCRED
    generation: int | None
    slot: int | None
    error: str | None


Handler = Callable[[int, int], int]  # (fd, generation) -> slot


class HandoverServer(Closing):
    """Unix SOCK_SEQPACKET server that registers listeners sent to it."""

    def __init__(self, path: str, mode: int = 0o600, group: int | None = None) -> None:
        """Listen on ``path``; with ``group``, members of that group may connect too
        (services that run as another user: the socket file's permissions are
        the only gate, so it is root-only unless a group is named)."""
        self.path = path
        if group is not None:
            mode |= 0o060
        with contextlib.suppress(FileNotFoundError):
            # A socket file left by a dead agent would make bind() fail.
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(path)
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, mode)
            self._sock.listen(16)
        except OSError as exc:
            self._sock.close()
            raise EnvironmentProblem(f"cannot listen on {path}: {exc.strerror}") from None

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return  # closed already: the path may be another server's by now
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def serve_one(self, handler: Handler, timeout: float | None = None) -> list[HandoverResult]:
        """Accept one client and serve its requests until it hangs up."""
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise EnvironmentProblem(f"no client connected to {self.path} in {timeout} s") from None
        with conn:
            conn.settimeout(timeout)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
            results: list[HandoverResult] = []
            while True:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(conn, _MAX_MSG, 4)
                except (TimeoutError, ConnectionError):
                    break
                if not data and not fds:
                    break  # orderly hang-up
                results.append(self._handle(conn, pid, data, fds, handler))
            return results

    @staticmethod
    def _handle(
        conn: socket.socket, pid: int, data: bytes, fds: list[int], handler: Handler
    ) -> HandoverResult:
        generation: int | None = None
        try:
            generation = parse_request(data)
            if len(fds) != 1:
                raise ValueError(f"expected exactly one fd with the request, got {len(fds)}")
            slot = handler(fds[0], generation)
        except (ControlPlaneError, ValueError) as exc:
            message = str(exc)
            conn.send(format_reply(None, message))
            return HandoverResult(pid, generation, None, message)
        finally:
            for fd in fds:
                os.close(fd)
        conn.send(format_reply(slot))
        return HandoverResult(pid, generation, slot, None)


# --- service side ---------------------------------------------------------


def send_listener(path: str, sock_fd: int, generation: int, timeout: float = 5.0) -> int:
    """Hand ``sock_fd`` to the agent at ``path`` for ``generation``; returns its slot."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot reach the agent at {path}: {exc.strerror}") from None
        s.sendmsg(
            [format_request(generation)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock_fd]))],
        )
        return parse_reply(s.recv(_MAX_MSG))
