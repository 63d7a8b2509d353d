"""The life of one ``offloadctl reuseport exec``: pure, transitions as a table.

One ``exec`` process is one *generation* of a reuseport group: it registered
its listeners, started CMD with them (socket activation), and now waits for
events. Every decision it makes (when to activate, when to retire, when to
stop CMD, which status to exit with) is a row of :data:`TRANSITIONS`::

    (phase, event kind) -> (next phase, action kinds)

Every pair is in the table (a test checks it), so an event that does not
apply in a phase is an explicit "nothing", never a surprise. The plumbing
(``controlplane.service.reuseport_exec``) turns signals, notify datagrams,
handover messages, timers and ``waitpid`` into events, feeds :func:`step`
and carries out the actions it returns, in order.

The handover, seen from both generations::

    N+1 STARTING --CMD says READY=1--> SERVING: activate N+1, tell N
    N   SERVING  --successor active--> HANDING_OVER: retire N, close our
                 copies of the listeners, SIGTERM CMD (it closes its copies:
                 the kernel migrates what is queued to N+1)
    N   HANDING_OVER --CMD exited--> EXITED with CMD's status

A reload (``--reload-signal``, e.g. SIGHUP from systemd's ``ExecReload=``)
makes N+1 without a new interpreter: N, SERVING, forks itself and the child
runs as N+1 (the same start as a new ``exec``, then the rows above)::

    N   SERVING   --reload signal--> RELOADING: RELOADING=1 to the manager,
                  fork N+1; a second reload signal meanwhile is ignored
    N   RELOADING --successor active--> HANDING_OVER (as from SERVING)
    N   RELOADING --N+1 exited first--> SERVING: READY=1 with the failure
                  as STATUS; N keeps serving
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from controlplane.core.reuseport_policy import MAX_GENERATION, GroupState
from controlplane.errors import EnvironmentProblem

__all__ = [
    "EXIT_NOT_READY",
    "STOP_SIGNALS",
    "TRANSITIONS",
    "Act",
    "Action",
    "Ev",
    "Event",
    "ExecState",
    "Phase",
    "exit_code",
    "is_successor",
    "next_generation",
    "step",
]

# exec's own status when it told CMD to stop because it never became ready (or
# a newer generation overtook it): the start failed, the predecessor serves.
EXIT_NOT_READY = 1
# Signals that ask the service to stop; exec forwards every signal it
# catches, these also mean "do not activate any more".
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


class Phase(enum.Enum):
    STARTING = "starting"  # listeners registered, CMD started, not ready yet
    SERVING = "serving"  # generation active (the target unless a newer one is)
    HANDING_OVER = "handing-over"  # a successor is active: retired, CMD told to stop
    STOPPING = "stopping"  # a stop signal was forwarded to CMD
    RELOADING = "reloading"  # serving, and a forked successor is starting
    ABORTING = "aborting"  # not ready in time, or overtaken while starting
    EXITED = "exited"


class Ev(enum.Enum):
    """Event kinds (past tense: what happened)."""

    READY_NOTIFIED = "ready-notified"  # CMD sent READY=1
    READY_DELAY_PASSED = "ready-delay-passed"  # --ready-after fallback fired
    READY_TIMED_OUT = "ready-timed-out"  # --ready-timeout passed without readiness
    STATUS_NOTIFIED = "status-notified"  # CMD sent STATUS=...
    SUCCESSOR_ACTIVATED = "successor-activated"  # checked against the kernel
    STOP_REQUESTED = "stop-requested"  # a signal of STOP_SIGNALS
    SIGNAL_RECEIVED = "signal-received"  # any other caught signal
    STOP_TIMED_OUT = "stop-timed-out"  # CMD ignored the stop signal too long
    CHILD_EXITED = "child-exited"
    RELOAD_REQUESTED = "reload-requested"  # the --reload-signal was caught
    SUCCESSOR_FAILED = "successor-failed"  # our forked successor exited before it was active


class Act(enum.Enum):
    """Action kinds (imperative: what to do), expanded by :func:`_expand`."""

    ACTIVATE = "activate"  # activate our generation in the group
    NOTIFY_READY = "notify-ready"  # READY=1 (+ MAINPID on a reload) to the outer manager
    TELL_PREDECESSORS = "tell-predecessors"  # older exec processes: we are active
    FORWARD_STATUS = "forward-status"  # STATUS=... to the outer manager
    FORWARD_SIGNAL = "forward-signal"  # the caught signal, to CMD
    RETIRE = "retire"  # retire our generation (frees its slots)
    CLOSE_LISTENERS = "close-listeners"  # our copies; CMD closes its own
    STOP_CHILD = "stop-child"  # the configured stop signal to CMD
    START_STOP_TIMER = "start-stop-timer"
    KILL_CHILD = "kill-child"  # SIGKILL: CMD ignored the stop signal
    EXIT = "exit"  # exit with exit_code(state)
    NOTIFY_RELOADING = "notify-reloading"  # RELOADING=1 to the outer manager
    FORK_SUCCESSOR = "fork-successor"  # fork; the child runs as the next generation
    NOTIFY_RELOAD_FAILED = "notify-reload-failed"  # READY=1 again, STATUS= why
    STOP_SUCCESSOR = "stop-successor"  # the stop signal, to the starting successor


@dataclass(frozen=True)
class Event:
    kind: Ev
    signo: int = 0  # STOP_REQUESTED / SIGNAL_RECEIVED
    status: int = 0  # CHILD_EXITED, SUCCESSOR_FAILED: exit code, or -signal when killed
    text: str = ""  # STATUS_NOTIFIED


@dataclass(frozen=True)
class Action:
    kind: Act
    signo: int = 0
    lines: tuple[str, ...] = ()
    code: int = 0


@dataclass(frozen=True, kw_only=True)
class ExecState:
    generation: int
    phase: Phase = Phase.STARTING
    stop_signal: int = signal.SIGTERM
    takeover: bool = False  # a predecessor was serving: we are a reload
    pid: int = 0  # our pid, for MAINPID= on a takeover
    child_status: int | None = None
    aborted: bool = False


# Short aliases for the table below.
S, SV, RL, H, ST, AB, X = (
    Phase.STARTING,
    Phase.SERVING,
    Phase.RELOADING,
    Phase.HANDING_OVER,
    Phase.STOPPING,
    Phase.ABORTING,
    Phase.EXITED,
)
_GIVE_UP = (Act.RETIRE, Act.CLOSE_LISTENERS, Act.STOP_CHILD, Act.START_STOP_TIMER)
_CLEAN_EXIT = (Act.RETIRE, Act.CLOSE_LISTENERS, Act.EXIT)

_Row = tuple[Phase, tuple[Act, ...]]
_TABLE: dict[tuple[Phase, Ev], _Row] = {
    # STARTING: listeners registered but not a target; the predecessor serves.
    (S, Ev.READY_NOTIFIED): (SV, (Act.ACTIVATE, Act.NOTIFY_READY, Act.TELL_PREDECESSORS)),
    (S, Ev.READY_DELAY_PASSED): (SV, (Act.ACTIVATE, Act.NOTIFY_READY, Act.TELL_PREDECESSORS)),
    (S, Ev.READY_TIMED_OUT): (AB, _GIVE_UP),
    (S, Ev.STATUS_NOTIFIED): (S, (Act.FORWARD_STATUS,)),
    # A newer generation got active before us (two restarts in a row): step aside.
    (S, Ev.SUCCESSOR_ACTIVATED): (AB, _GIVE_UP),
    # Never activate once asked to stop; free the slots now.
    (S, Ev.STOP_REQUESTED): (ST, (Act.RETIRE, Act.CLOSE_LISTENERS, Act.FORWARD_SIGNAL)),
    (S, Ev.SIGNAL_RECEIVED): (S, (Act.FORWARD_SIGNAL,)),
    (S, Ev.STOP_TIMED_OUT): (S, ()),
    # Failed start: retire what was never active; the predecessor keeps serving.
    (S, Ev.CHILD_EXITED): (X, _CLEAN_EXIT),
    # Not serving yet: nothing to reload from (a new exec would take over anyway).
    (S, Ev.RELOAD_REQUESTED): (S, ()),
    (S, Ev.SUCCESSOR_FAILED): (S, ()),
    # SERVING
    (SV, Ev.READY_NOTIFIED): (SV, ()),
    (SV, Ev.READY_DELAY_PASSED): (SV, ()),
    (SV, Ev.READY_TIMED_OUT): (SV, ()),
    (SV, Ev.STATUS_NOTIFIED): (SV, (Act.FORWARD_STATUS,)),
    (SV, Ev.SUCCESSOR_ACTIVATED): (H, _GIVE_UP),
    # Stop: CMD drains; our generation stays registered until CMD is gone, so
    # a successor arriving meanwhile still gets the queue (row below).
    (SV, Ev.STOP_REQUESTED): (ST, (Act.FORWARD_SIGNAL,)),
    (SV, Ev.SIGNAL_RECEIVED): (SV, (Act.FORWARD_SIGNAL,)),
    (SV, Ev.STOP_TIMED_OUT): (SV, ()),
    # Crash: closing migrates the queue to another active generation if any.
    (SV, Ev.CHILD_EXITED): (X, _CLEAN_EXIT),
    (SV, Ev.RELOAD_REQUESTED): (RL, (Act.NOTIFY_RELOADING, Act.FORK_SUCCESSOR)),
    (SV, Ev.SUCCESSOR_FAILED): (SV, ()),
    # RELOADING: SERVING while the forked successor starts; it tells us (and
    # the kernel confirms) when it is active, as any successor does.
    (RL, Ev.READY_NOTIFIED): (RL, ()),
    (RL, Ev.READY_DELAY_PASSED): (RL, ()),
    (RL, Ev.READY_TIMED_OUT): (RL, ()),
    (RL, Ev.STATUS_NOTIFIED): (RL, (Act.FORWARD_STATUS,)),
    (RL, Ev.SUCCESSOR_ACTIVATED): (H, _GIVE_UP),
    # Stopping the service stops the half-started successor too (it retires itself).
    (RL, Ev.STOP_REQUESTED): (ST, (Act.FORWARD_SIGNAL, Act.STOP_SUCCESSOR)),
    (RL, Ev.SIGNAL_RECEIVED): (RL, (Act.FORWARD_SIGNAL,)),
    (RL, Ev.STOP_TIMED_OUT): (RL, ()),
    (RL, Ev.CHILD_EXITED): (X, _CLEAN_EXIT),
    # One reload at a time: a reload signal while one is starting is ignored
    # (the starting successor already runs the newest code and config).
    (RL, Ev.RELOAD_REQUESTED): (RL, ()),
    (RL, Ev.SUCCESSOR_FAILED): (SV, (Act.NOTIFY_RELOAD_FAILED,)),
    # HANDING_OVER: retired and closed; only CMD's exit is awaited.
    (H, Ev.READY_NOTIFIED): (H, ()),
    (H, Ev.READY_DELAY_PASSED): (H, ()),
    (H, Ev.READY_TIMED_OUT): (H, ()),
    (H, Ev.STATUS_NOTIFIED): (H, ()),  # the successor speaks for the service now
    (H, Ev.SUCCESSOR_ACTIVATED): (H, ()),
    (H, Ev.STOP_REQUESTED): (H, (Act.FORWARD_SIGNAL,)),
    (H, Ev.SIGNAL_RECEIVED): (H, (Act.FORWARD_SIGNAL,)),
    (H, Ev.STOP_TIMED_OUT): (H, (Act.KILL_CHILD,)),
    (H, Ev.CHILD_EXITED): (X, (Act.EXIT,)),
    (H, Ev.RELOAD_REQUESTED): (H, ()),
    (H, Ev.SUCCESSOR_FAILED): (H, ()),
    # STOPPING
    (ST, Ev.READY_NOTIFIED): (ST, ()),
    (ST, Ev.READY_DELAY_PASSED): (ST, ()),
    (ST, Ev.READY_TIMED_OUT): (ST, ()),
    (ST, Ev.STATUS_NOTIFIED): (ST, (Act.FORWARD_STATUS,)),
    (ST, Ev.SUCCESSOR_ACTIVATED): (ST, (Act.RETIRE, Act.CLOSE_LISTENERS)),
    (ST, Ev.STOP_REQUESTED): (ST, (Act.FORWARD_SIGNAL,)),
    (ST, Ev.SIGNAL_RECEIVED): (ST, (Act.FORWARD_SIGNAL,)),
    (ST, Ev.STOP_TIMED_OUT): (ST, ()),
    (ST, Ev.CHILD_EXITED): (X, _CLEAN_EXIT),
    (ST, Ev.RELOAD_REQUESTED): (ST, ()),
    (ST, Ev.SUCCESSOR_FAILED): (ST, ()),
    # ABORTING: retired and closed, CMD told to stop; it never serves again.
    (AB, Ev.READY_NOTIFIED): (AB, ()),
    (AB, Ev.READY_DELAY_PASSED): (AB, ()),
    (AB, Ev.READY_TIMED_OUT): (AB, ()),
    (AB, Ev.STATUS_NOTIFIED): (AB, ()),
    (AB, Ev.SUCCESSOR_ACTIVATED): (AB, ()),
    (AB, Ev.STOP_REQUESTED): (AB, (Act.FORWARD_SIGNAL,)),
    (AB, Ev.SIGNAL_RECEIVED): (AB, (Act.FORWARD_SIGNAL,)),
    (AB, Ev.STOP_TIMED_OUT): (AB, (Act.KILL_CHILD,)),
    (AB, Ev.CHILD_EXITED): (X, (Act.EXIT,)),
    (AB, Ev.RELOAD_REQUESTED): (AB, ()),
    (AB, Ev.SUCCESSOR_FAILED): (AB, ()),
}
_TABLE.update({(X, ev): (X, ()) for ev in Ev})  # terminal: nothing happens any more
TRANSITIONS: Mapping[tuple[Phase, Ev], _Row] = MappingProxyType(_TABLE)


def exit_code(state: ExecState) -> int:
    """CMD's status as a shell reports it (128+N when killed by signal N), or
    EXIT_NOT_READY for a start we gave up on (CMD then died of our signal)."""
    if state.aborted:
        return EXIT_NOT_READY
    status = state.child_status or 0
    return 128 - status if status < 0 else status


def _expand(kind: Act, state: ExecState, event: Event) -> Action:
    if kind is Act.FORWARD_SIGNAL:
        return Action(kind, signo=event.signo)
    if kind is Act.STOP_CHILD:
        return Action(kind, signo=state.stop_signal)
    if kind is Act.KILL_CHILD:
        return Action(kind, signo=signal.SIGKILL)
    if kind is Act.NOTIFY_READY:
        # On a reload the outer manager must follow us: we outlive the old main pid.
        main = (f"MAINPID={state.pid}",) if state.takeover else ()
        return Action(kind, lines=(*main, "READY=1", f"STATUS=generation {state.generation}"))
    if kind is Act.FORWARD_STATUS:
        return Action(kind, lines=(f"STATUS={event.text}",))
    if kind is Act.NOTIFY_RELOADING:
        # Plumbing appends MONOTONIC_USEC= (systemd >= 253 matches the reload by it).
        return Action(
            kind, lines=("RELOADING=1", f"STATUS=generation {state.generation}: reloading")
        )
    if kind is Act.NOTIFY_RELOAD_FAILED:
        status = event.status
        why = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return Action(
            kind,
            lines=(
                "READY=1",
                f"STATUS=generation {state.generation}: reload failed (successor {why})",
            ),
        )
    if kind is Act.STOP_SUCCESSOR:
        return Action(kind, signo=signal.SIGTERM)
    if kind is Act.EXIT:
        return Action(kind, code=exit_code(state))
    return Action(kind)


def step(state: ExecState, event: Event) -> tuple[ExecState, tuple[Action, ...]]:
    """One transition: the next state and the actions to carry out, in order."""
    phase, kinds = TRANSITIONS[(state.phase, event.kind)]
    new = replace(state, phase=phase)
    if event.kind is Ev.CHILD_EXITED and state.phase is not Phase.EXITED:
        new = replace(new, child_status=event.status)
    if phase is Phase.ABORTING and state.phase is not Phase.ABORTING:
        new = replace(new, aborted=True)
    return new, tuple(_expand(k, new, event) for k in kinds)


def next_generation(state: GroupState) -> int:
    """The generation a new ``exec`` takes: one above every known generation."""
    newest = max(state.generations(), default=0)
    if newest >= MAX_GENERATION:
        raise EnvironmentProblem(
            f"generation {newest} is the last possible one; unload and load the group again"
        )
    return newest + 1


def is_successor(own: int, claimed: int, target_generation: int) -> bool:
    """Believe a "successor active" message only if the group's target agrees.

    ``target_generation`` is the newest active generation that still has
    open listeners (read from the kernel when the message arrives). A message
    claiming a newer generation that is not the target (not yet, or no longer:
    it may have died since it sent the message) must not make us retire: we
    would leave the group without a listener.
    """
    return claimed > own and target_generation >= claimed
