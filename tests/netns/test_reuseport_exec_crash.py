"""Crash restarts with ``offloadctl reuseport exec``: connections waiting in a
generation's accept queue (established) or still half-open when that
generation is SIGKILLed.

The kernel migrates on close, whoever closes: when the last descriptor of a
listener goes (here: because its processes were killed), its queued children
and requests are handed to the program, which moves them to the target. So
what a SIGKILL loses depends only on whether a newer *active* generation
exists at that moment:

- yes: nothing is lost (both cases below, and a hung server killed by exec's
  own --stop-timeout);
- no: the queue has nowhere to go and every queued connection is reset
  (``test_without_a_newer_generation_the_queue_is_reset``): with the port's
  last listener the kernel's reuseport group is gone, and the program is not
  even asked. An older active generation that still listens takes the queue
  instead, by the kernel's own choice until the group is next synced
  (``test_a_crash_before_the_handover_falls_back_to_the_older_one``).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.kernel.bpf.loader import load_group
from controlplane.reuseport import ReuseportGroup
from tests.netns import test_reuseport_support as sup
from tests.netns.test_reuseport_exec import SERVER, Exec, status, wait_target

N = 50
HOLD = [sys.executable, str(SERVER), "--mode", "hold"]
SERVE = [sys.executable, str(SERVER), "--mode", "serve"]


@pytest.fixture(scope="module")
def bpffs() -> Iterator[str]:
    with sup.private_bpffs() as path:
        yield path


def accept_queue(netns: str) -> int:
    """Connections waiting in the accept queues of every listener on the port."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{sup.PORT}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.strip())


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def kill9(ex: Exec) -> None:
    """SIGKILL the whole generation: exec and its CMD."""
    for pid in (*children(ex.proc.pid), ex.proc.pid):
        os.kill(pid, signal.SIGKILL)
    ex.proc.wait(10)


def queue_clients(netns: str, state: str, tmp_path: Path) -> list[socket.socket]:
    if state == "request":
        sup.drop_final_ack(netns, str(tmp_path))
    clients = sup.open_clients(netns, socket.AF_INET, N, fastopen=False)
    if state == "request":
        sup.wait_for("half-open requests", lambda: sup.syn_recv_count(netns) == N, 15)
    else:
        sup.wait_for("queued children", lambda: accept_queue(netns) == N, 15)
    return clients


def served_all(outcome: sup.Outcome) -> bool:
    return sorted(outcome.served) == [b"new:" + sup.payload(i) for i in range(N)]


@pytest.mark.parametrize("state", ["established", "request"])
def test_sigkill_of_the_old_generation_migrates_its_queue(
    netns: str, bpffs: str, tmp_path: Path, state: str
) -> None:
    load_group("web", netns=netns, bpffs=bpffs)
    old = Exec(netns, bpffs, tmp_path / "old.log", HOLD)  # never accepts: a hung server
    new = None
    try:
        wait_target(netns, bpffs, 1, old)
        clients = queue_clients(netns, state, tmp_path)
        # The old generation cannot take part in the handover (stopped, then killed).
        os.kill(old.proc.pid, signal.SIGSTOP)
        new = Exec(netns, bpffs, tmp_path / "new.log", SERVE)
        wait_target(netns, bpffs, 2, new)
        kill9(old)
        if state == "request":
            sup.pass_ack(netns)
        outcome = sup.collect(clients, timeout=8)

        assert outcome.reset == 0 and outcome.other == []
        assert served_all(outcome)
        c = status(netns, bpffs).counters
        moved = c.migrated_established if state == "established" else c.migrated_request
        assert (moved, c.dropped, c.fallback) == (N, 0, 0)
    finally:
        for ex in (old, new):
            if ex is not None:
                ex.kill()


def test_a_hung_old_server_is_killed_after_stop_timeout_and_its_queue_migrates(
    netns: str, bpffs: str, tmp_path: Path
) -> None:
    load_group("web", netns=netns, bpffs=bpffs)
    hung = [*HOLD, "--ignore-term"]
    old = Exec(netns, bpffs, tmp_path / "old.log", hung, "--stop-timeout", "0.5")
    new = None
    try:
        wait_target(netns, bpffs, 1, old)
        clients = queue_clients(netns, "established", tmp_path)
        new = Exec(netns, bpffs, tmp_path / "new.log", SERVE)
        wait_target(netns, bpffs, 2, new)
        # The old exec retires, SIGTERM is ignored, SIGKILL after 0.5 s: exit 128+9.
        assert old.wait() == 128 + signal.SIGKILL
        outcome = sup.collect(clients, timeout=8)

        assert outcome.reset == 0 and outcome.other == []
        assert served_all(outcome)
        c = status(netns, bpffs).counters
        assert (c.migrated_established, c.dropped, c.fallback) == (N, 0, 0)
    finally:
        for ex in (old, new):
            if ex is not None:
                ex.kill()


def test_without_a_newer_generation_the_queue_is_reset(
    netns: str, bpffs: str, tmp_path: Path
) -> None:
    load_group("web", netns=netns, bpffs=bpffs)
    only = Exec(netns, bpffs, tmp_path / "only.log", HOLD)
    try:
        wait_target(netns, bpffs, 1, only)
        clients = queue_clients(netns, "established", tmp_path)
        kill9(only)
        outcome = sup.collect(clients, timeout=8)

        assert outcome.served == [] and outcome.reset == N
        # The port's last listener closed: the kernel's reuseport group went with it,
        # so there was nothing to migrate within and the program was not even asked.
        c = status(netns, bpffs).counters
        assert (c.migrated, c.dropped, c.fallback) == (0, 0, 0)
    finally:
        only.kill()


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def stop_outside_the_group_lock(pid: int, netns: str, bpffs: str) -> None:
    """SIGSTOP an exec while the test holds the group's lock, so the stopped
    exec cannot be holding it (it may be waiting for it, which holds nothing):
    stopped inside the lock it would block every later change to the group."""
    with ReuseportGroup.open("web", netns=netns, bpffs=bpffs) as g:
        fd = os.open(g.pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.kill(pid, signal.SIGSTOP)
            # Released only once it has stopped: a waiter woken by our unlock
            # before the stop took effect would take the lock first.
            sup.wait_for(f"exec {pid} to stop", lambda: _state(pid) == "T", 15)
        finally:
            os.close(fd)


def test_a_crash_before_the_handover_falls_back_to_the_older_one(
    netns: str, bpffs: str, tmp_path: Path
) -> None:
    """Generation 2 is active but dies with a queue before generation 1 has
    handed over (1 stopped): 1 still listens, so it gets the queue back.

    Nobody rewrote the program's table after 2 died, so the program finds no
    live listener of 2 and leaves the choice to the kernel (counted as
    ``fallback``), whose hash can only pick 1's listener; the next change to
    the group (here ``sync``) makes 1 the target again."""
    load_group("web", netns=netns, bpffs=bpffs)
    old = Exec(netns, bpffs, tmp_path / "old.log", SERVE)
    new = None
    try:
        wait_target(netns, bpffs, 1, old)
        stop_outside_the_group_lock(old.proc.pid, netns, bpffs)  # CMD serves on
        new = Exec(netns, bpffs, tmp_path / "new.log", HOLD)
        wait_target(netns, bpffs, 2, new)
        clients = queue_clients(netns, "established", tmp_path)
        kill9(new)
        outcome = sup.collect(clients, timeout=8)
        # Woken up, 1 finds 2's "I am active" from before its death and must not
        # believe it: retiring now would leave the port without a target.
        os.kill(old.proc.pid, signal.SIGCONT)
        sup.wait_for(
            "the old exec to weigh the stale handover message",
            lambda: "claims to be active" in old.log.read_text(),
            timeout=15,
        )
        assert old.proc.poll() is None

        assert outcome.reset == 0 and outcome.other == []
        assert served_all(outcome)
        c = status(netns, bpffs).counters
        assert (c.migrated_established, c.fallback, c.dropped) == (0, N, 0)
        with ReuseportGroup.open("web", netns=netns, bpffs=bpffs) as g:
            g.sync()
            assert g.status().target_generation == 1
    finally:
        for ex in (old, new):
            if ex is not None:
                ex.kill()
