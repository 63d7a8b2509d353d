"""The agent's control socket: a Unix stream socket, root only, mode 0600.

Server side: non-blocking, driven by the agent's selector (no thread). Each
connection has a bounded input buffer (one line of at most
:data:`protocol.MAX_LINE`), a bounded output buffer and an idle deadline, so
garbage, oversized lines and clients that never read cannot stall the agent or
grow its memory. Access is checked twice: the socket file is 0600 in a
directory only root can write (so nobody else can replace it), and the peer's
``SO_PEERCRED`` uid must be 0 (defence in depth should the mode be loosened).

Client side: :func:`try_client` is what ``offloadctl status|reload|flows`` call
to find out whether an agent runs in a namespace; ``None`` means "no agent,
talk to the kernel directly".
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.agent import private_dir, protocol
from controlplane.errors import EnvironmentProblem

DEFAULT_SOCKET_DIR = Path("/run/offloadctl")
IDLE_TIMEOUT = 5.0  # seconds a client may take to send a line or read an answer
MAX_CLIENTS = 16  # concurrent connections; the next one is answered and closed
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}

Handler = Callable[[protocol.Request], bytes]


def default_socket_path(netns: str | None) -> Path:
    return DEFAULT_SOCKET_DIR / f"{netns or 'host'}.sock"


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_socket(path: Path) -> socket.socket:
    """Create the listening socket at ``path`` with mode 0600, checked after bind."""
    private_dir.ensure(path.parent, "control socket directory", "--socket")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise EnvironmentProblem(f"{path} exists and is not a socket; refusing to replace it")
        if _is_live(path):
            raise EnvironmentProblem(
                f"another agent answers on {path}; stop it first (one agent per namespace)"
            )
        path.unlink()  # a stale socket from an agent that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # umask so the file is born 0600: no window in which others could connect.
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) != 0o600 or st.st_uid != os.geteuid():
        sock.close()
        raise EnvironmentProblem(
            f"control socket {path} has mode {stat.S_IMODE(st.st_mode):04o} owner {st.st_uid}"
            " after bind (expected 0600, ours); refusing to serve"
        )
    sock.listen(MAX_CLIENTS)
    sock.setblocking(False)
    return sock


def peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[1])


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    close_after_write: bool = False


@dataclass
class ServerStats:
    requests: int = 0
    errors: int = 0
    refused: int = 0
    timeouts: int = 0


class ControlServer:
    """Serves the control protocol from the agent's selector; never blocks."""

    def __init__(
        self,
        path: Path,
        selector: selectors.BaseSelector,
        handler: Handler,
        *,
        clock: Callable[[], float] = time.monotonic,
        idle_timeout: float = IDLE_TIMEOUT,
        allowed_uids: frozenset[int] = frozenset({0}),
    ) -> None:
        self.path = path
        self._sel = selector
        self._handler = handler
        self._clock = clock
        self._idle = idle_timeout
        self._allowed = allowed_uids
        self._conns: dict[int, _Conn] = {}
        self.stats = ServerStats()
        self._listener = bind_socket(path)
        self._sel.register(self._listener, selectors.EVENT_READ, self._on_accept)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listener)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            # Only remove the socket if it is still ours (not a successor's).
            self.path.unlink()

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self._conns.values()), default=None)

    def expire(self) -> None:
        now = self._clock()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self.stats.timeouts += 1
            self._drop(conn)

    # -- selector callbacks -------------------------------------------------

    def _on_accept(self, _mask: int) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE: the client sees a reset; the agent goes on
            sock.setblocking(False)
            conn = _Conn(sock, self._clock() + self._idle)
            if peer_uid(sock) not in self._allowed:
                self.stats.refused += 1
                self._answer_and_close(
                    conn, protocol.error("permission_denied", "the control socket is root only")
                )
                continue
            if len(self._conns) >= MAX_CLIENTS:
                self.stats.refused += 1
                self._answer_and_close(
                    conn, protocol.error("unavailable", "too many control connections")
                )
                continue
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, self._callback(conn))

    def _answer_and_close(self, conn: _Conn, line: bytes) -> None:
        with contextlib.suppress(OSError):
            conn.sock.send(line)  # small: fits the socket buffer or is lost; never blocks
        conn.sock.close()

    def _callback(self, conn: _Conn) -> Callable[[int], None]:
        def on_ready(mask: int) -> None:
            if mask & selectors.EVENT_READ:
                self._on_read(conn)
            if mask & selectors.EVENT_WRITE and conn.sock.fileno() in self._conns:
                self._flush(conn)
                if not conn.outbuf and conn.sock.fileno() in self._conns:
                    self._process(conn)  # requests that arrived while an answer was pending

        return on_ready

    def _on_read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not chunk:
            self._drop(conn)
            return
        if conn.close_after_write:
            return  # ignore anything after a fatal error; we are closing
        conn.inbuf += chunk
        conn.deadline = self._clock() + self._idle
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        # One answer in flight at a time: while it is unsent we stop reading, so a
        # client that pipelines requests without reading answers is held back by
        # its own socket buffer, not by our memory.
        while not conn.outbuf and not conn.close_after_write:
            nl = conn.inbuf.find(b"\n", 0, protocol.MAX_LINE + 1)
            if nl < 0:
                if len(conn.inbuf) > protocol.MAX_LINE:
                    self.stats.errors += 1
                    conn.inbuf.clear()
                    conn.close_after_write = True
                    self._queue(
                        conn,
                        protocol.error(
                            "line_too_long",
                            f"a request line is at most {protocol.MAX_LINE} bytes",
                        ),
                    )
                return
            line = bytes(conn.inbuf[:nl])
            del conn.inbuf[: nl + 1]
            self._respond(conn, line)

    def _respond(self, conn: _Conn, line: bytes) -> None:
        if not line.strip():
            return
        self.stats.requests += 1
        try:
            answer = self._handler(protocol.decode_request(line))
        except protocol.ProtocolError as exc:
            self.stats.errors += 1
            answer = protocol.error_from(exc)
        except Exception as exc:  # a bug of ours: answer it, never let a request end the agent
            self.stats.errors += 1
            answer = protocol.error("internal", f"{type(exc).__name__}: {str(exc)[:200]}")
        self._queue(conn, answer)

    def _queue(self, conn: _Conn, data: bytes) -> None:
        conn.outbuf += data
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            while conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(conn)
            return
        if conn.outbuf:
            # The client is not reading: wait for writability (only), bounded by the deadline.
            conn.deadline = self._clock() + self._idle
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, self._callback(conn))
            return
        if conn.close_after_write:
            self._drop(conn)
            return
        self._sel.modify(conn.sock, selectors.EVENT_READ, self._callback(conn))

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            self._conns.pop(fd, None)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
        conn.sock.close()


# -- client --------------------------------------------------------------------


class AgentUnavailable(EnvironmentProblem):
    """The agent's socket exists but the agent did not answer properly."""


class Client:
    """One connection to a running agent; ``call`` sends a request and waits."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self._sock = sock
        self.path = path
        self._buf = bytearray()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> protocol.Response:
        self._sock.settimeout(timeout)
        try:
            # Refused at accept (root only, too many clients): the answer saying
            # why may already be waiting; read it rather than report a broken pipe.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._sock.sendall(protocol.encode_request(op, **args))
            while (nl := self._buf.find(b"\n")) < 0:
                if len(self._buf) > protocol.MAX_RESPONSE:
                    raise AgentUnavailable(f"the agent on {self.path} sent an oversized answer")
                chunk = self._sock.recv(1 << 20)
                if not chunk:
                    raise AgentUnavailable(f"the agent on {self.path} closed the connection")
                self._buf += chunk
        except TimeoutError:
            raise AgentUnavailable(
                f"the agent on {self.path} did not answer {op!r} within {timeout:.0f} s"
            ) from None
        except OSError as exc:
            raise AgentUnavailable(f"talking to the agent on {self.path}: {exc.strerror}") from None
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        try:
            return protocol.decode_response(line)
        except protocol.ProtocolError as exc:
            raise AgentUnavailable(f"the agent on {self.path}: {exc.message}") from None


def connect(path: Path, timeout: float = 5.0) -> Client | None:
    """A client for the agent on ``path``; None if no agent listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except PermissionError:
        sock.close()
        raise EnvironmentProblem(_denied(path)) from None
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOTSOCK, errno.ENOTDIR):
            return None
        raise AgentUnavailable(f"cannot connect to the agent on {path}: {exc.strerror}") from None
    return Client(sock, path)


def _denied(path: Path) -> str:
    """What is true when connecting to ``path`` was refused: the socket exists and
    is root only, or its directory cannot be searched (then nobody can tell)."""
    try:
        os.stat(path)
    except PermissionError:
        return (
            f"cannot tell whether an agent answers on {path}: {path.parent} is not"
            f" accessible to uid {os.geteuid()}; run as root"
        )
    except OSError:
        return f"no agent's control socket at {path}, and {path.parent} refused access; run as root"
    return f"an agent's control socket {path} exists but is root only; run as root"


def try_client(netns: str | None, path: Path | None = None) -> Client | None:
    """The running agent of ``netns`` (None = host), or None when there is none."""
    return connect(path or default_socket_path(netns))
