"""``offloadctl reuseport exec``: the process, descriptor and signal plumbing.

One call of :func:`run` is one generation of a reuseport group: it opens the
listeners (``SO_REUSEPORT``), registers them as the next generation, starts
CMD with them by socket activation and then pumps events into the pure state
machine (:mod:`controlplane.core.reuseport_handover`), carrying out the
actions it returns. Nothing here decides; it only translates:

==========================  ==============================================
outside world               event / action
==========================  ==============================================
datagram ``READY=1`` from   READY_NOTIFIED (only CMD's own pid counts, as
CMD on our NOTIFY_SOCKET    systemd's default ``NotifyAccess=main``)
datagram from a successor   SUCCESSOR_ACTIVATED, if the kernel targets it
caught signal               STOP_REQUESTED / RELOAD_REQUESTED (the
                            --reload-signal) / SIGNAL_RECEIVED
SIGCHLD + waitpid           CHILD_EXITED, or SUCCESSOR_FAILED for a forked
                            successor that exits before it is active
deadlines                   READY_DELAY_PASSED, READY_TIMED_OUT, STOP_TIMED_OUT
==========================  ==============================================

Generations find each other by abstract Unix datagram sockets named after
the group and generation (per network namespace, gone when the process is),
and check the sender's credentials and the kernel's target before believing
a message.

A reload forks: no new interpreter starts (its CPU, ~70 ms of imports, is
what lengthened the connect tail of the running server during a restart; see
docs/reuseport-api.md). exec runs no threads (the pump is one selector loop,
signals arrive through set_wakeup_fd), so the child of ``fork()`` holds a
consistent copy of every lock and module. The child closes its copies of the
parent's listeners, sockets and group descriptors (so the parent's retire
and close still migrate the queue), then runs :func:`run` with the same
options, as a new ``exec`` would, and ends with ``os._exit`` (the parent's
``finally`` blocks are not the child's to run).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from controlplane.agent import notify
from controlplane.core import reuseport_handover as hv
from controlplane.core import reuseport_policy as policy
from controlplane.core.reuseport_handover import Act, Ev, Event, ExecState, Phase
from controlplane.core.socket_activation import (
    LISTEN_FDS_START,
    MAX_DATAGRAM,
    ListenSpec,
    activation_env,
    format_successor,
    parse_notify,
    parse_successor,
)
from controlplane.errors import ConfigError, ConfigIssue, ControlPlaneError, EnvironmentProblem
from controlplane.kernel.bpf.loader import DEFAULT_BPFFS, netns_label
from controlplane.kernel.netns import entered
from controlplane.reuseport import ReuseportGroup

__all__ = ["FORWARDED_SIGNALS", "ExecOptions", "control_address", "run", "run_detached"]

# Caught and passed on to CMD (the ones servers use for reload, scaling, stop).
FORWARDED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
_PR_SET_PDEATHSIG = 1
_CREDS = struct.Struct("iII")  # struct ucred {pid, uid, gid}


@dataclass(frozen=True, kw_only=True)
class ExecOptions:
    name: str
    listens: tuple[ListenSpec, ...]
    argv: tuple[str, ...]
    netns: str | None = None
    bpffs: str = DEFAULT_BPFFS
    backlog: int = 4096
    ready_after: float | None = None  # activate without READY=1 after this long
    ready_timeout: float = 90.0  # give up on a CMD that is not ready by then
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 90.0  # SIGKILL a CMD that ignores stop_signal this long
    reload_signal: int | None = None  # fork the next generation on it (not forwarded)


def control_address(name: str, generation: int) -> str:
    """The abstract socket a generation's ``exec`` receives handover news on."""
    return f"\0offloadctl-reuseport-exec/{name}/{generation}"


def _log(prefix: str, msg: str) -> None:
    print(f"{prefix}: {msg}", file=sys.stderr, flush=True)


def open_listeners(specs: Sequence[ListenSpec], backlog: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for spec in specs:
            family = socket.AF_INET6 if spec.family == 6 else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # before bind()
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((spec.host, spec.port))
            except OSError as exc:
                raise EnvironmentProblem(
                    f"cannot listen on {spec}: {exc.strerror} (another listener without"
                    " SO_REUSEPORT, or of another user, holds the port)"
                ) from None
            s.listen(backlog)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _recv_with_creds(sock: socket.socket) -> tuple[bytes, int, int] | None:
    """One datagram and its sender's (pid, uid) as the kernel vouches for them."""
    try:
        data, anc, _flags, _addr = sock.recvmsg(
            MAX_DATAGRAM + 1, socket.CMSG_SPACE(_CREDS.size), socket.MSG_DONTWAIT
        )
    except (BlockingIOError, InterruptedError):
        return None
    pid = uid = -1
    for level, kind, value in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, uid, _gid = _CREDS.unpack(value[: _CREDS.size])
    return data, pid, uid


def _dgram_socket(address: str | None = None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    if address is not None:
        s.bind(address)
    s.setblocking(False)
    return s


def _spawn(
    argv: Sequence[str],
    socks: Sequence[socket.socket],
    specs: Sequence[ListenSpec],
    notify_address: str,
    generation: int,
    pdeathsig: int,
) -> int:
    """fork + exec CMD with the listeners at fds 3.. and LISTEN_PID = its own pid."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: only async-signal-safe-ish steps, then exec
        signal.set_wakeup_fd(-1)
        for sig in (*FORWARDED_SIGNALS, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)  # Python ignores SIGPIPE; CMD must not
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, pdeathsig, 0, 0, 0)
        if os.getppid() != parent:  # exec died before prctl took effect
            os._exit(1)
        high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 256) for s in socks]
        for i, fd in enumerate(high):
            os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
        os.closerange(LISTEN_FDS_START + len(high), 65536)
        env = activation_env(
            os.environ, specs, pid=os.getpid(), notify_socket=notify_address, generation=generation
        )
        os.execvpe(argv[0], list(argv), env)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"offloadctl reuseport exec: cannot run {argv[0]!r}: {exc}\n".encode())
    os._exit(127)


class _Generation:
    """The pump: events from the world into ``hv.step``, its actions back out."""

    def __init__(
        self,
        opts: ExecOptions,
        group: ReuseportGroup,
        socks: list[socket.socket],
        state: ExecState,
        on_active: Callable[[int], None] | None,
    ) -> None:
        self.opts = opts
        self.group = group
        self.socks = socks
        self.state = state
        self.on_active = on_active
        self.prefix = f"offloadctl reuseport exec[{opts.name}/{state.generation}]"
        self.child = 0
        self.successor = 0  # our forked next generation, while we may reap it
        self.owned: list[contextlib.AbstractContextManager[object]] = []  # closed by a fork
        self.deadlines: dict[Ev, float] = {}
        self.code: int | None = None

    def log(self, msg: str) -> None:
        _log(self.prefix, msg)

    def run(self) -> int:
        gen = self.state.generation
        with contextlib.ExitStack() as stack:
            ctl = stack.enter_context(_dgram_socket(control_address(self.opts.name, gen)))
            # os.urandom, not secrets: secrets imports OpenSSL (hmac), start-up CPU
            # that competes with the server during a restart.
            notify_name = f"{control_address(self.opts.name, gen)}/notify-{os.urandom(6).hex()}"
            nfy = stack.enter_context(_dgram_socket(notify_name))
            wake_r, wake_w = socket.socketpair()
            stack.enter_context(wake_r)
            stack.enter_context(wake_w)
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            self.owned = [ctl, nfy, wake_r, wake_w]
            stack.enter_context(_signals_to(wake_w.fileno()))
            self.child = _spawn(
                self.opts.argv,
                self.socks,
                self.opts.listens,
                "@" + notify_name[1:],
                gen,
                self.opts.stop_signal,
            )
            self.log(
                f"pid {self.child} started with {len(self.socks)} listener(s)"
                f" ({', '.join(map(str, self.opts.listens))}); waiting for READY=1"
            )
            now = time.monotonic()
            self.deadlines[Ev.READY_TIMED_OUT] = now + self.opts.ready_timeout
            if self.opts.ready_after is not None:
                self.deadlines[Ev.READY_DELAY_PASSED] = now + self.opts.ready_after
            sel = stack.enter_context(selectors.DefaultSelector())
            self.owned.append(sel)
            sel.register(ctl, selectors.EVENT_READ, self._on_control)
            sel.register(nfy, selectors.EVENT_READ, self._on_notify)
            sel.register(wake_r, selectors.EVENT_READ, self._on_signals)
            self._reap()  # a CMD that died before the handlers were in place
            while self.code is None:
                now = time.monotonic()
                due = [ev for ev, t in self.deadlines.items() if t <= now]
                for ev in due:
                    del self.deadlines[ev]
                    self.feed(Event(ev))
                if self.code is not None:
                    break
                timeout = max(0.0, min(self.deadlines.values()) - now) if self.deadlines else None
                for key, _ in sel.select(timeout):
                    key.data(key.fileobj)
        return self.code

    # --- events in --------------------------------------------------------------

    def _on_signals(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(256)
        except BlockingIOError:
            return
        for signo in data:
            if signo == signal.SIGCHLD:
                self._reap()
            elif signo == self.opts.reload_signal:
                self.feed(Event(Ev.RELOAD_REQUESTED, signo=signo))
            elif signo in hv.STOP_SIGNALS:
                self.feed(Event(Ev.STOP_REQUESTED, signo=signo))
            else:
                self.feed(Event(Ev.SIGNAL_RECEIVED, signo=signo))

    def _reap(self) -> None:
        if self.successor:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.successor, os.WNOHANG)
                if pid == self.successor:
                    self.successor = 0
                    code = os.waitstatus_to_exitcode(status)
                    self.log(f"reload: the forked generation (pid {pid}) exited ({code})")
                    self.feed(Event(Ev.SUCCESSOR_FAILED, status=code))
        if self.code is not None or self.state.phase is Phase.EXITED:
            return
        with contextlib.suppress(ChildProcessError):
            pid, status = os.waitpid(self.child, os.WNOHANG)
            if pid == self.child:
                self.feed(Event(Ev.CHILD_EXITED, status=os.waitstatus_to_exitcode(status)))

    def _on_notify(self, sock: socket.socket) -> None:
        got = _recv_with_creds(sock)
        if got is None:
            return
        data, pid, _uid = got
        if pid != self.child:
            self.log(f"ignored a notify message from pid {pid} (only CMD, pid {self.child})")
            return
        fields = parse_notify(data)
        if "STATUS" in fields:
            self.feed(Event(Ev.STATUS_NOTIFIED, text=fields["STATUS"]))
        if fields.get("READY") == "1":
            self.feed(Event(Ev.READY_NOTIFIED))

    def _on_control(self, sock: socket.socket) -> None:
        got = _recv_with_creds(sock)
        if got is None:
            return
        data, pid, uid = got
        claimed = parse_successor(data)
        if claimed is None or uid not in (0, os.geteuid()):
            self.log(f"ignored a handover message from pid {pid} (uid {uid}): {data[:64]!r}")
            return
        try:
            # The target as the live listeners make it (dead generations skipped),
            # not the program's table: a successor may have died since it wrote it.
            target = policy.target(self.group.state()).generation
        except ControlPlaneError as exc:
            self.log(f"cannot read the group to check generation {claimed}: {exc}")
            return
        if hv.is_successor(self.state.generation, claimed, target):
            self.feed(Event(Ev.SUCCESSOR_ACTIVATED))
        else:
            self.log(f"generation {claimed} claims to be active, the kernel targets {target}")

    # --- actions out ------------------------------------------------------------

    def feed(self, event: Event) -> None:
        before = self.state.phase
        self.state, actions = hv.step(self.state, event)
        if self.state.phase is not before:
            self.log(f"{before.value} -> {self.state.phase.value} ({event.kind.value})")
        for action in actions:
            self._do(action.kind, action)

    def _do(self, kind: Act, action: hv.Action) -> None:
        gen = self.state.generation
        if kind is Act.ACTIVATE:
            self.deadlines.pop(Ev.READY_TIMED_OUT, None)
            self.deadlines.pop(Ev.READY_DELAY_PASSED, None)
            self.group.activate(gen)
            self.log(f"generation {gen} active")
            if self.on_active is not None:
                self.on_active(gen)
        elif kind in (Act.NOTIFY_READY, Act.FORWARD_STATUS, Act.NOTIFY_RELOAD_FAILED):
            notify.notify(*action.lines)
        elif kind is Act.NOTIFY_RELOADING:
            notify.notify(*action.lines, f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        elif kind is Act.FORK_SUCCESSOR:
            self._fork_successor()
        elif kind is Act.STOP_SUCCESSOR:
            if self.successor:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.successor, action.signo)
        elif kind is Act.TELL_PREDECESSORS:
            self._tell_predecessors()
        elif kind in (Act.FORWARD_SIGNAL, Act.STOP_CHILD, Act.KILL_CHILD):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, action.signo)
        elif kind is Act.RETIRE:
            try:
                freed = self.group.retire(gen)
            except ControlPlaneError as exc:
                self.log(f"could not retire generation {gen}: {exc}")
            else:
                self.log(f"generation {gen} retired ({len(freed)} slot(s) freed)")
        elif kind is Act.CLOSE_LISTENERS:
            for s in self.socks:
                s.close()
        elif kind is Act.START_STOP_TIMER:
            self.deadlines[Ev.STOP_TIMED_OUT] = time.monotonic() + self.opts.stop_timeout
        elif kind is Act.EXIT:
            self.log(f"CMD exited; exit status {action.code}")
            self.code = action.code

    def _fork_successor(self) -> None:
        """Fork; the child runs the next generation as a new ``exec`` would."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            self.successor = pid
            self.log(f"reload: pid {pid} starts the next generation (forked, no new interpreter)")
            self._reap()  # a child that already failed, its SIGCHLD came before we knew its pid
            return
        code = 1
        try:
            signal.set_wakeup_fd(-1)  # the parent's pipe; run() sets up our own
            # Until run() catches them again: a stop ends us, a reload is the parent's.
            for sig in FORWARDED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(self.opts.reload_signal or signal.SIGHUP, signal.SIG_IGN)
            for s in self.socks:  # else our copies would keep the parent's generation open
                s.close()
            for owned in self.owned:
                owned.__exit__(None, None, None)
            self.group.close()
            code = run(self.opts)
        except ControlPlaneError as exc:
            print(f"offloadctl: {exc}", file=sys.stderr, flush=True)
            code = exc.exit_code
        except BaseException as exc:  # never let the parent's frames unwind in the child
            with contextlib.suppress(Exception):
                print(f"offloadctl: reload failed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _tell_predecessors(self) -> None:
        gen = self.state.generation
        older = [g for g in self.group.state().generations() if g < gen]
        with _dgram_socket() as s:
            for g in older:
                try:
                    s.sendto(format_successor(gen), control_address(self.opts.name, g))
                except (ConnectionRefusedError, FileNotFoundError):
                    continue  # not run by 'exec': it retires itself (library users)
                except BlockingIOError:
                    self.log(f"generation {g} did not take the handover message")
                    continue
                self.log(f"told generation {g} to hand over")


@contextlib.contextmanager
def _signals_to(fd: int) -> Iterator[None]:
    """Signals as bytes on ``fd`` (set_wakeup_fd), handled in the loop, not in handlers."""
    sigs = (*FORWARDED_SIGNALS, signal.SIGCHLD)
    old = {sig: signal.signal(sig, lambda *_: None) for sig in sigs}
    previous_fd = signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _check_cmd(argv: Sequence[str]) -> None:
    if not argv:
        raise ConfigError([ConfigIssue("CMD", "missing: give the command after '--'")])
    if shutil.which(argv[0]) is None:
        raise ConfigError(
            [ConfigIssue("CMD", f"{argv[0]!r} is not an executable file (nor found in PATH)")]
        )


def run(opts: ExecOptions, on_active: Callable[[int], None] | None = None) -> int:
    """Serve one generation until CMD exits; returns the exit status to use."""
    _check_cmd(opts.argv)
    with entered(opts.netns):
        group = ReuseportGroup.open(opts.name, netns=opts.netns, bpffs=opts.bpffs)
        with group:
            socks = open_listeners(opts.listens, opts.backlog)
            try:
                # A group that already has a target is being reloaded: we take over.
                takeover = policy.target(group.state()).generation != 0
                generation, slots = group.register_generation(socks)
                state = ExecState(
                    generation=generation,
                    stop_signal=opts.stop_signal,
                    takeover=takeover,
                    pid=os.getpid(),
                )
                gen = _Generation(opts, group, socks, state, on_active)
                gen.log(
                    f"registered as generation {generation} (slots"
                    f" {','.join(map(str, slots))}) in {netns_label(opts.netns)}"
                )
                try:
                    return gen.run()
                except BaseException:
                    with contextlib.suppress(ControlPlaneError):
                        group.retire(generation)
                    raise
            finally:
                for s in socks:
                    s.close()


def run_detached(opts: ExecOptions) -> tuple[int, int]:
    """Start the generation in the background; return once it is active or failed.

    Returns (generation or 0, status): for ``ExecReload=``, which must end
    while the new generation keeps running. The background process tells the
    outer service manager its pid (MAINPID=) when it takes over.
    """
    _check_cmd(opts.argv)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        code = 1

        def tell_parent(generation: int) -> None:
            os.write(w, f"active {generation}\n".encode())

        try:
            code = run(opts, on_active=tell_parent)
        except ControlPlaneError as exc:
            print(f"offloadctl: {exc}", file=sys.stderr, flush=True)
            code = exc.exit_code
        finally:
            with contextlib.suppress(OSError):
                os.write(w, f"exit {code}\n".encode())
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        first = pipe.readline().decode().split()
    if first[:1] == ["active"]:
        return int(first[1]), 0
    code = int(first[1]) if first[:1] == ["exit"] else 1
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return 0, code
