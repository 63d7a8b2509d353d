"""``exec --reload-signal HUP``: the running exec forks the next generation
(no new interpreter), against the real kernel: gunicorn reloaded by SIGHUP
under load without a reset, the manager told RELOADING=1 then the new
MAINPID, and a reload whose server fails leaves the old generation serving."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.kernel.bpf.loader import load_group
from tests.netns import test_reuseport_support as sup
from tests.netns.test_reuseport_exec import (
    GROUP,
    REPO,
    SERVER,
    Exec,
    FakeSystemd,
    HttpLoad,
    assert_every_request_answered,
    pid_alive,
    status,
    wait_target,
)

RELOADS = 8


@pytest.fixture(scope="module")
def bpffs() -> Iterator[str]:
    with sup.private_bpffs() as path:
        yield path


def main_pids(manager: FakeSystemd) -> list[int]:
    """Every MAINPID= the manager heard, in order."""
    return [
        int(line.removeprefix("MAINPID="))
        for msg in manager.drain()
        for line in msg.split("\n")
        if line.startswith("MAINPID=")
    ]


def stop_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        sup.wait_for(f"pid {pid} to exit", lambda p=pid: not pid_alive(p), 15)


def test_sighup_reloads_gunicorn_under_load_without_a_reset(
    netns: str, bpffs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    assert gunicorn is not None, "gunicorn is a dev dependency (pip install gunicorn)"
    load_group(GROUP, netns=netns, bpffs=bpffs)
    manager = FakeSystemd(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(manager.path))
    cmd = [
        *("env", "WSGI_DELAY_MS=20"),
        *(gunicorn, "--workers", "2", "--graceful-timeout", "10", "--no-control-socket"),
        *("--chdir", str(REPO / "examples"), "wsgi_generation:app"),
    ]
    log = tmp_path / "exec.log"
    first = Exec(netns, bpffs, log, cmd, "--reload-signal", "HUP")
    load = HttpLoad(netns, clients=8)
    pids = [first.proc.pid]
    try:
        wait_target(netns, bpffs, 1, first)
        load.start()
        load.wait_served(1)
        for gen in range(2, RELOADS + 2):
            os.kill(pids[-1], signal.SIGHUP)
            sup.wait_for(
                f"MAINPID of generation {gen}", lambda n=gen: len(main_pids(manager)) >= n - 1, 30
            )
            pids.append(main_pids(manager)[-1])
            assert status(netns, bpffs).target_generation == gen
            # The old generation hands over and exits (its gunicorn stopped gracefully).
            sup.wait_for(f"generation {gen - 1} to exit", lambda p=pids[-2]: not pid_alive(p), 30)
            load.wait_served(gen)
        assert first.wait() == 0, log.read_text()
        load.stop.set()
        load.join(timeout=10)
        assert_every_request_answered(load, netns, bpffs, RELOADS + 1)
        heard = manager.drain()
        # Each reload: RELOADING=1 from the old main pid, then the new one's MAINPID + READY=1.
        assert sum(m.startswith("RELOADING=1\n") for m in heard) == RELOADS
        assert all("\nMONOTONIC_USEC=" in m for m in heard if m.startswith("RELOADING=1"))
        assert len(set(pids)) == len(pids) and pid_alive(pids[-1])
        text = log.read_text()
        assert "forked, no new interpreter" in text
        assert text.count("handing-over -> exited") == RELOADS
    finally:
        load.stop.set()
        first.kill()
        stop_pids(pids[1:])


def test_a_reload_that_fails_leaves_the_old_generation_serving(
    netns: str, bpffs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_group(GROUP, netns=netns, bpffs=bpffs)
    manager = FakeSystemd(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(manager.path))
    broken = tmp_path / "broken"
    # The server fails (status 3) while the file exists, as a bad deploy would.
    serve = [
        *("sh", "-c", f'test -e {broken} && exit 3; exec "$@"', "sh"),
        *(sys.executable, str(SERVER), "--mode", "serve"),
    ]
    log = tmp_path / "exec.log"
    main = Exec(netns, bpffs, log, serve, "--reload-signal", "HUP")
    pids: list[int] = []
    try:
        wait_target(netns, bpffs, 1, main)
        broken.touch()
        main.proc.send_signal(signal.SIGHUP)
        sup.wait_for(
            "the failed reload reported",
            lambda: any("reload failed" in m for m in manager.drain()),
            30,
        )
        failed = next(m for m in manager.heard if "reload failed" in m)
        assert failed == (
            "READY=1\nSTATUS=generation 1: reload failed (successor exited with status 3)"
        )
        assert manager.heard.index(failed) > next(
            i for i, m in enumerate(manager.heard) if m.startswith("RELOADING=1")
        )
        assert main.proc.poll() is None
        st = status(netns, bpffs)
        assert [(g.generation, g.target) for g in st.generations] == [(1, True)]
        assert main_pids(manager) == []
        clients = sup.open_clients(netns, socket.AF_INET, 5, fastopen=False)
        assert len(sup.collect(clients, timeout=5).served) == 5
        assert "reloading -> serving (successor-failed)" in log.read_text()

        # The failure left nothing behind: the next reload works.
        broken.unlink()
        main.proc.send_signal(signal.SIGHUP)
        sup.wait_for("the second reload's MAINPID", lambda: bool(main_pids(manager)), 30)
        pids = main_pids(manager)
        assert main.wait() == 128 + signal.SIGTERM  # this server has no SIGTERM handler
        # The failed generation 2 retired itself (slots freed): the number is reused.
        assert status(netns, bpffs).target_generation == 2
    finally:
        main.kill()
        stop_pids(pids)


def forked(log: Path) -> list[int]:
    """The pids the log says a reload forked, in order."""
    return [
        int(line.split("reload: pid ", 1)[1].split()[0])
        for line in log.read_text().splitlines()
        if "reload: pid " in line
    ]


def test_a_reload_signal_during_a_reload_is_ignored(netns: str, bpffs: str, tmp_path: Path) -> None:
    load_group(GROUP, netns=netns, bpffs=bpffs)
    log = tmp_path / "exec.log"
    # 'sleep' never says READY=1: each generation activates 1 s after its start,
    # the window in which the second SIGHUP arrives.
    main = Exec(netns, bpffs, log, ["sleep", "60"], "--ready-after", "1", "--reload-signal", "HUP")
    pids: list[int] = []
    try:
        wait_target(netns, bpffs, 1, main)
        main.proc.send_signal(signal.SIGHUP)
        sup.wait_for("the reload's fork", lambda: bool(forked(log)), 15)
        main.proc.send_signal(signal.SIGHUP)  # a separate signal: the first was handled
        pids = forked(log)
        assert main.wait() == 128 + signal.SIGTERM  # handed over; sleep died of SIGTERM
        # Every decision of the old exec is in its log now: one fork, one generation.
        assert forked(log) == pids and len(pids) == 1
        st = status(netns, bpffs)
        assert [(g.generation, g.target) for g in st.generations] == [(2, True)]
        assert pid_alive(pids[0])
    finally:
        main.kill()
        stop_pids(pids)


def test_a_stop_during_a_reload_stops_the_forked_generation_too(
    netns: str, bpffs: str, tmp_path: Path
) -> None:
    load_group(GROUP, netns=netns, bpffs=bpffs)
    log = tmp_path / "exec.log"
    main = Exec(netns, bpffs, log, ["sleep", "60"], "--ready-after", "5", "--reload-signal", "HUP")
    pids: list[int] = []
    try:
        sup.wait_for("generation 1", lambda: "generation 1 active" in log.read_text(), 15)
        main.proc.send_signal(signal.SIGHUP)
        sup.wait_for("the reload's fork", lambda: bool(forked(log)), 15)
        pids = forked(log)
        sup.wait_for(
            "the forked generation to start its CMD (its signals are caught then)",
            lambda: f"exec[{GROUP}/2]: pid " in log.read_text(),
            15,
        )
        main.proc.send_signal(signal.SIGTERM)
        assert main.wait() == 128 + signal.SIGTERM
        sup.wait_for("the forked generation to exit", lambda: not pid_alive(pids[0]), 15)
        assert status(netns, bpffs).generations == ()  # both retired; nothing activated
        assert "generation 2 active" not in log.read_text()
    finally:
        main.kill()
        stop_pids(pids)
