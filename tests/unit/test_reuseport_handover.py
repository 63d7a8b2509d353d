"""The handover state machine of ``offloadctl reuseport exec``, checked with hypothesis.

Any sequence of events (in any order, with repeats: signals, late timers and
duplicate messages happen) must keep the promises the docs make: activate
only on readiness and never after retiring, stop CMD only after our
listeners are retired and closed, exit exactly once with CMD's status.
"""

from __future__ import annotations

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core import reuseport_handover as h
from controlplane.core.reuseport_handover import Act, Ev, Event, ExecState, Phase
from controlplane.core.reuseport_policy import GroupState
from controlplane.errors import EnvironmentProblem

events = st.one_of(
    st.sampled_from(
        [
            Event(Ev.READY_NOTIFIED),
            Event(Ev.READY_DELAY_PASSED),
            Event(Ev.READY_TIMED_OUT),
            Event(Ev.STATUS_NOTIFIED, text="booted"),
            Event(Ev.SUCCESSOR_ACTIVATED),
            Event(Ev.STOP_TIMED_OUT),
            Event(Ev.SIGNAL_RECEIVED, signo=signal.SIGHUP),
            Event(Ev.RELOAD_REQUESTED, signo=signal.SIGHUP),
        ]
    ),
    st.integers(-64, 255).map(lambda c: Event(Ev.SUCCESSOR_FAILED, status=c)),
    st.sampled_from(sorted(h.STOP_SIGNALS)).map(lambda s: Event(Ev.STOP_REQUESTED, signo=s)),
    st.integers(-64, 255).map(lambda c: Event(Ev.CHILD_EXITED, status=c)),
)

# The same, with readiness and reload signals as often as everything else together:
# three events in a row without a stop, an exit or a failure are then common.
reload_events = st.one_of(
    st.sampled_from(
        [
            Event(Ev.READY_NOTIFIED),
            Event(Ev.RELOAD_REQUESTED, signo=signal.SIGHUP),
            Event(Ev.RELOAD_REQUESTED, signo=signal.SIGHUP),
            Event(Ev.SIGNAL_RECEIVED, signo=signal.SIGUSR1),
        ]
    ),
    events,
)


def run(events: list[Event], **kw: object) -> tuple[ExecState, list[list[h.Action]]]:
    state = ExecState(generation=7, pid=4242, **kw)  # type: ignore[arg-type]
    steps = []
    for ev in events:
        state, actions = h.step(state, ev)
        steps.append(list(actions))
    return state, steps


def test_every_phase_and_event_has_a_row() -> None:
    assert set(h.TRANSITIONS) == {(p, e) for p in Phase for e in Ev}


def test_a_graceful_handover_from_both_sides() -> None:
    new, steps = run([Event(Ev.READY_NOTIFIED)], takeover=True)
    assert new.phase is Phase.SERVING
    assert [a.kind for a in steps[0]] == [Act.ACTIVATE, Act.NOTIFY_READY, Act.TELL_PREDECESSORS]
    assert steps[0][1].lines == ("MAINPID=4242", "READY=1", "STATUS=generation 7")

    old, steps = run(
        [
            Event(Ev.READY_NOTIFIED),
            Event(Ev.SUCCESSOR_ACTIVATED),
            Event(Ev.CHILD_EXITED, status=0),
        ]
    )
    assert [a.kind for a in steps[1]] == [
        Act.RETIRE,
        Act.CLOSE_LISTENERS,
        Act.STOP_CHILD,
        Act.START_STOP_TIMER,
    ]
    assert steps[1][2].signo == signal.SIGTERM
    assert [(a.kind, a.code) for a in steps[2]] == [(Act.EXIT, 0)]
    assert old.phase is Phase.EXITED


def test_first_start_sends_no_mainpid() -> None:
    _, steps = run([Event(Ev.READY_DELAY_PASSED)])
    assert steps[0][1].lines == ("READY=1", "STATUS=generation 7")


@pytest.mark.parametrize(
    ("status", "code"), [(0, 0), (3, 3), (-signal.SIGKILL, 137), (-signal.SIGTERM, 143)]
)
def test_exit_code_is_the_childs_as_a_shell_says_it(status: int, code: int) -> None:
    _, steps = run([Event(Ev.READY_NOTIFIED), Event(Ev.CHILD_EXITED, status=status)])
    assert steps[-1][-1] == h.Action(Act.EXIT, code=code)


@pytest.mark.parametrize("status", [0, -signal.SIGTERM])
def test_a_start_that_never_got_ready_fails_whatever_cmd_exits_with(status: int) -> None:
    _, steps = run([Event(Ev.READY_TIMED_OUT), Event(Ev.CHILD_EXITED, status=status)])
    assert steps[-1][-1] == h.Action(Act.EXIT, code=h.EXIT_NOT_READY)


def test_stop_timeout_kills_only_a_child_that_was_told_to_stop() -> None:
    _, steps = run([Event(Ev.READY_NOTIFIED), Event(Ev.STOP_TIMED_OUT)])
    assert steps[-1] == []
    _, steps = run(
        [Event(Ev.READY_NOTIFIED), Event(Ev.SUCCESSOR_ACTIVATED), Event(Ev.STOP_TIMED_OUT)],
        stop_signal=signal.SIGQUIT,
    )
    assert steps[1][2] == h.Action(Act.STOP_CHILD, signo=signal.SIGQUIT)
    assert steps[-1] == [h.Action(Act.KILL_CHILD, signo=signal.SIGKILL)]


@settings(max_examples=400)
@given(st.lists(events, max_size=14), st.booleans())
def test_promises_hold_for_any_event_sequence(evs: list[Event], takeover: bool) -> None:
    state, steps = run(evs, takeover=takeover)
    flat = [(i, a) for i, acts in enumerate(steps) for a in acts]
    kinds = [a.kind for _, a in flat]

    # Activated at most once, only on readiness while starting, never after retiring.
    activations = [i for i, a in flat if a.kind is Act.ACTIVATE]
    assert len(activations) <= 1
    for i in activations:
        assert evs[i].kind in (Ev.READY_NOTIFIED, Ev.READY_DELAY_PASSED)
        assert Act.RETIRE not in [a.kind for j, a in flat if j < i]
    if activations:
        # Predecessors hear of it in the same step, after the activation.
        step_kinds = [a.kind for a in steps[activations[0]]]
        assert step_kinds.index(Act.TELL_PREDECESSORS) > step_kinds.index(Act.ACTIVATE)
    else:
        assert Act.TELL_PREDECESSORS not in kinds and Act.NOTIFY_READY not in kinds

    # CMD is told to stop only once our listeners are out of the group and closed.
    for n, kind in enumerate(kinds):
        if kind is Act.STOP_CHILD:
            assert Act.RETIRE in kinds[:n] and Act.CLOSE_LISTENERS in kinds[:n]
        if kind is Act.KILL_CHILD:
            assert Act.STOP_CHILD in kinds[:n]

    # Exactly one exit, after the first CHILD_EXITED, last of everything, with its status.
    exits = [(i, a) for i, a in flat if a.kind is Act.EXIT]
    child_exits = [i for i, e in enumerate(evs) if e.kind is Ev.CHILD_EXITED]
    assert len(exits) == (1 if child_exits else 0)
    if exits:
        i, action = exits[0]
        assert i == child_exits[0] and flat[-1] == exits[0]
        status = evs[i].status
        code = 128 - status if status < 0 else status
        assert action.code == (h.EXIT_NOT_READY if state.aborted else code)
        assert state.phase is Phase.EXITED
    # Every signal that was caught before the exit reached CMD.
    end = child_exits[0] if child_exits else len(evs)
    caught = [e.signo for e in evs[:end] if e.kind in (Ev.SIGNAL_RECEIVED, Ev.STOP_REQUESTED)]
    forwarded = [a.signo for i, a in flat if a.kind is Act.FORWARD_SIGNAL]
    assert forwarded == caught


def test_a_reload_forks_once_and_hands_over_like_a_restart() -> None:
    state, steps = run(
        [
            Event(Ev.READY_NOTIFIED),
            Event(Ev.RELOAD_REQUESTED, signo=signal.SIGHUP),
            Event(Ev.RELOAD_REQUESTED, signo=signal.SIGHUP),  # while one starts: ignored
            Event(Ev.SUCCESSOR_ACTIVATED),
            Event(Ev.CHILD_EXITED, status=0),
        ]
    )
    assert [a.kind for a in steps[1]] == [Act.NOTIFY_RELOADING, Act.FORK_SUCCESSOR]
    assert steps[1][0].lines == ("RELOADING=1", "STATUS=generation 7: reloading")
    assert steps[2] == []
    assert [a.kind for a in steps[3]] == [
        Act.RETIRE,
        Act.CLOSE_LISTENERS,
        Act.STOP_CHILD,
        Act.START_STOP_TIMER,
    ]
    assert steps[4] == [h.Action(Act.EXIT, code=0)] and state.phase is Phase.EXITED


def test_a_failed_reload_keeps_serving_and_says_so() -> None:
    state, steps = run(
        [
            Event(Ev.READY_NOTIFIED),
            Event(Ev.RELOAD_REQUESTED, signo=signal.SIGHUP),
            Event(Ev.SUCCESSOR_FAILED, status=-signal.SIGKILL),
            Event(Ev.RELOAD_REQUESTED, signo=signal.SIGHUP),
        ]
    )
    assert steps[2] == [
        h.Action(
            Act.NOTIFY_RELOAD_FAILED,
            lines=("READY=1", "STATUS=generation 7: reload failed (successor killed by signal 9)"),
        )
    ]
    assert state.phase is Phase.RELOADING  # the next reload signal tries again
    assert [a.kind for a in steps[3]] == [Act.NOTIFY_RELOADING, Act.FORK_SUCCESSOR]


def test_stopping_during_a_reload_stops_the_successor_too() -> None:
    state, steps = run(
        [
            Event(Ev.READY_NOTIFIED),
            Event(Ev.RELOAD_REQUESTED, signo=signal.SIGHUP),
            Event(Ev.STOP_REQUESTED, signo=signal.SIGTERM),
        ]
    )
    assert steps[2] == [
        h.Action(Act.FORWARD_SIGNAL, signo=signal.SIGTERM),
        h.Action(Act.STOP_SUCCESSOR, signo=signal.SIGTERM),
    ]
    assert state.phase is Phase.STOPPING


@settings(max_examples=400)
@given(st.lists(reload_events, max_size=14), st.booleans())
def test_reload_promises_hold_for_any_event_sequence(evs: list[Event], takeover: bool) -> None:
    _, steps = run(evs, takeover=takeover)
    pending = False  # a forked successor that has neither failed nor taken over
    retired = False
    for ev, acts in zip(evs, steps, strict=True):
        kinds = [a.kind for a in acts]
        if Act.FORK_SUCCESSOR in kinds:
            # Only on the reload signal, never two at once, never once out of the group;
            # the manager hears RELOADING=1 first.
            assert ev.kind is Ev.RELOAD_REQUESTED and not pending and not retired
            assert kinds == [Act.NOTIFY_RELOADING, Act.FORK_SUCCESSOR]
            pending = True
        elif ev.kind is Ev.RELOAD_REQUESTED:
            assert kinds == []  # ignored, and never forwarded to CMD
        if Act.STOP_SUCCESSOR in kinds:
            assert pending
        if Act.NOTIFY_RELOAD_FAILED in kinds:
            assert pending and ev.kind is Ev.SUCCESSOR_FAILED
        if ev.kind is Ev.SUCCESSOR_FAILED and pending and not retired:
            assert kinds == [Act.NOTIFY_RELOAD_FAILED]
        if ev.kind in (Ev.SUCCESSOR_FAILED, Ev.SUCCESSOR_ACTIVATED):
            pending = False
        if Act.RETIRE in kinds or ev.kind in (Ev.STOP_REQUESTED, Ev.CHILD_EXITED):
            retired = True


def test_successor_is_believed_only_when_the_kernel_targets_it() -> None:
    assert h.is_successor(own=3, claimed=4, target_generation=4)
    assert h.is_successor(own=3, claimed=4, target_generation=5)
    assert not h.is_successor(own=3, claimed=4, target_generation=3)
    assert not h.is_successor(own=3, claimed=3, target_generation=3)
    assert not h.is_successor(own=4, claimed=3, target_generation=4)


def test_next_generation_is_above_every_known_one() -> None:
    assert h.next_generation(GroupState(capacity=4)) == 1
    state = GroupState(capacity=4, slots={0: 5, 1: 2}, active=frozenset({9}))
    assert h.next_generation(state) == 10
    with pytest.raises(EnvironmentProblem, match="last possible"):
        h.next_generation(GroupState(capacity=1, slots={0: 2**32 - 1}))
